// herald console: the only script. Pages work without it; it adds "select
// this page" and carries the checked jobs into the purge form too.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var all = document.getElementById("select-page");
  var boxes = function () {
    return Array.prototype.slice.call(document.querySelectorAll('#jobs input[name="id"]'));
  };
  if (all) {
    all.addEventListener("change", function () {
      boxes().forEach(function (b) { b.checked = all.checked; });
    });
  }
  var purge = document.getElementById("purge");
  if (purge) {
    purge.addEventListener("submit", function () {
      Array.prototype.slice.call(purge.querySelectorAll('input[name="id"]')).forEach(function (i) { i.remove(); });
      boxes().filter(function (b) { return b.checked; }).forEach(function (b) {
        var copy = document.createElement("input");
        copy.type = "hidden";
        copy.name = "id";
        copy.value = b.value;
        purge.appendChild(copy);
      });
    });
  }
});
