// Sort a table by the clicked column (numbers numerically, text alphabetically); no other behaviour.
(function () {
  function key(cell) {
    var text = cell.textContent.trim().replace(/,/g, "");
    var n = parseFloat(text);
    return isNaN(n) || !/^[-+]?[\d.]/.test(text) ? text.toLowerCase() : n;
  }
  function compare(a, b) {
    if (typeof a === typeof b) { return a < b ? -1 : a > b ? 1 : 0; }
    return typeof a === "number" ? -1 : 1;
  }
  document.querySelectorAll("table.data").forEach(function (table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, col) {
      if (th.classList.contains("num")) {
        table.querySelectorAll("tbody tr").forEach(function (tr) {
          if (tr.children[col]) { tr.children[col].classList.add("num"); }
        });
      }
      if (!table.classList.contains("sortable")) { return; }
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var c = compare(key(r1.cells[col]), key(r2.cells[col]));
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
