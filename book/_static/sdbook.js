/* sdlib book: click-to-enlarge figures and a small player for precomputed figure frames.
 *
 * Served from the build (book/_static), loaded on every page by _config.yml (html_js_files); it fetches
 * nothing. Two parts:
 *
 * 1. Lightbox. Every image of a figure or cell output can be clicked (or focused and Enter pressed): it is
 *    shown over the page at its natural resolution (the book's figures are rendered at twice the pixels
 *    they are displayed with), scaled down only to fit the window; click, Escape or Enter closes it.
 *
 * 2. Player. A notebook cell writes <div class="sd-player"><script type="application/json">{...}</script></div>
 *    (sdlib.player.player_html), glued into a numbered figure. The JSON holds sliders (each a list of precomputed values) and line series
 *    whose y values were computed ahead of time for every combination of the sliders they depend on; the
 *    player draws the series for the sliders' current values as an SVG line plot. No kernel, no network.
 */
(function () {
  "use strict";

  // ------------------------------------------------------------------------------------------ lightbox
  function openLightbox(img) {
    var overlay = document.createElement("div");
    overlay.className = "sd-lightbox";
    overlay.setAttribute("role", "dialog");
    overlay.setAttribute("aria-modal", "true");
    overlay.setAttribute("aria-label", "Enlarged figure: " + (img.alt || "image") + " (click or Escape to close)");
    overlay.tabIndex = -1;
    var big = document.createElement("img");
    big.src = img.currentSrc || img.src;
    big.alt = img.alt;
    overlay.appendChild(big);
    function close() {
      document.removeEventListener("keydown", onKey);
      overlay.remove();
      (img.closest("a") || img).focus();
    }
    function onKey(event) {
      if (event.key === "Escape" || event.key === "Enter") { event.preventDefault(); close(); }
    }
    overlay.addEventListener("click", close);
    // after the event that opened it (an Enter key press would otherwise reach this listener and close it)
    setTimeout(function () { document.addEventListener("keydown", onKey); }, 0);
    document.body.appendChild(overlay);
    overlay.focus();
  }

  function setupLightbox() {
    var images = document.querySelectorAll("article figure img, article .cell_output img");
    images.forEach(function (img) {
      // Sphinx links a figure's image to its file (a fallback without JavaScript); other links stay links.
      var link = img.closest("a");
      if (link && !link.classList.contains("image-reference")) { return; }
      img.classList.add("sd-zoomable");
      img.title = "Click to enlarge";
      var target = link || img;
      if (!link) {
        img.tabIndex = 0;
        img.setAttribute("role", "button");
      }
      target.addEventListener("click", function (event) { event.preventDefault(); openLightbox(img); });
      target.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); openLightbox(img); }
      });
    });
  }

  // -------------------------------------------------------------------------------------------- player
  var SVG_NS = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, parent) {
    var el = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (key) { el.setAttribute(key, attrs[key]); });
    if (parent) { parent.appendChild(el); }
    return el;
  }

  function niceTicks(lo, hi, count) {
    var span = hi - lo;
    var step = Math.pow(10, Math.floor(Math.log10(span / count)));
    var err = (count * step) / span;
    if (err <= 0.15) { step *= 10; } else if (err <= 0.35) { step *= 5; } else if (err <= 0.75) { step *= 2; }
    var ticks = [];
    for (var v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
      ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return ticks;
  }

  function formatTick(v, log) {
    if (log) {
      var e = Math.round(Math.log10(v));
      if (e >= 0 && e <= 2) { return String(Math.pow(10, e)); }
      return "10" + String(e).replace("-", "\u2212").split("").map(function (c) {
        return "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079".charAt(
          c === "\u2212" ? 0 : 1 + "0123456789".indexOf(c));
      }).join("");
    }
    var s = Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(0) : String(+v.toPrecision(6));
    return s.replace("-", "\u2212");
  }

  function Player(root, spec) {
    this.root = root;
    this.spec = spec;
    this.index = {};
    var self = this;
    var controls = document.createElement("div");
    controls.className = "sd-player-controls";
    spec.sliders.forEach(function (slider) {
      var label = document.createElement("label");
      var name = document.createElement("span");
      name.className = "sd-player-name";
      name.textContent = slider.label;
      var input = document.createElement("input");
      input.type = "range";
      input.min = "0";
      input.max = String(slider.values.length - 1);
      input.step = "1";
      input.value = String(slider.initial || 0);
      input.setAttribute("data-slider", slider.name);
      input.setAttribute("aria-label", slider.label);
      var out = document.createElement("output");
      label.appendChild(name);
      label.appendChild(input);
      label.appendChild(out);
      controls.appendChild(label);
      self.index[slider.name] = slider.initial || 0;
      function update() {
        self.index[slider.name] = parseInt(input.value, 10);
        var text = slider.labels ? slider.labels[self.index[slider.name]] : String(slider.values[self.index[slider.name]]);
        out.textContent = text;
        input.setAttribute("aria-valuetext", slider.label + " " + text);
        self.draw();
      }
      input.addEventListener("input", update);
      self["update_" + slider.name] = update;
    });
    root.appendChild(controls);
    this.svg = svg("svg", { role: "img", "aria-label": spec.alt || "interactive figure", "class": "sd-player-svg" });
    root.appendChild(this.svg);
    spec.sliders.forEach(function (slider) { self["update_" + slider.name](); });
    // drawn at the width of the column (text stays at its size on a phone), again when that width changes
    var drawnWidth = this.width();
    window.addEventListener("resize", function () {
      if (self.width() !== drawnWidth) { drawnWidth = self.width(); self.draw(); }
    });
  }

  Player.prototype.width = function () {
    var full = this.spec.width || 640;
    var column = Math.floor(this.root.getBoundingClientRect().width) - 2;  // minus the border
    return column > 0 ? Math.max(300, Math.min(full, column)) : full;
  };

  Player.prototype.frame = function (series) {
    var depends = series.depends || [];
    if (depends.length === 0) { return series.y; }
    var flat = 0;
    var spec = this.spec;
    var self = this;
    depends.forEach(function (name) {
      var slider = spec.sliders.filter(function (s) { return s.name === name; })[0];
      flat = flat * slider.values.length + self.index[name];
    });
    return series.y[flat];
  };

  Player.prototype.draw = function () {
    var spec = this.spec;
    var self = this;
    var width = this.width();
    var full = spec.height || 360;
    var height = Math.round(Math.max(full * width / (spec.width || 640), Math.min(full, 0.8 * width)));
    this.svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    this.svg.setAttribute("width", width);
    this.svg.setAttribute("height", height);
    var m = { left: 74, right: 14, top: 30, bottom: 56 };
    var plotW = width - m.left - m.right;
    var plotH = height - m.top - m.bottom;
    var ylog = !!spec.ylog;
    var fy = ylog ? function (v) { return Math.log10(v); } : function (v) { return v; };
    var x0 = spec.xlim[0], x1 = spec.xlim[1], y0 = fy(spec.ylim[0]), y1 = fy(spec.ylim[1]);
    function px(v) { return m.left + ((v - x0) / (x1 - x0)) * plotW; }
    function py(v) { return m.top + (1 - (fy(v) - y0) / (y1 - y0)) * plotH; }
    var root = this.svg;
    while (root.firstChild) { root.removeChild(root.firstChild); }
    svg("rect", { x: 0, y: 0, width: width, height: height, fill: "#fff" }, root);
    var clipId = "clip-" + (this.root.id || Math.random().toString(36).slice(2));
    var defs = svg("defs", {}, root);
    var clip = svg("clipPath", { id: clipId }, defs);
    svg("rect", { x: m.left, y: m.top, width: plotW, height: plotH }, clip);
    // axes and ticks
    var axis = svg("g", { "class": "sd-axis", "font-size": 16, fill: "#222" }, root);
    var xticks = spec.xticks || niceTicks(x0, x1, 6);
    xticks.forEach(function (v) {
      svg("line", { x1: px(v), x2: px(v), y1: m.top, y2: m.top + plotH, stroke: "#e4e4e4" }, axis);
      var t = svg("text", { x: px(v), y: m.top + plotH + 20, "text-anchor": "middle" }, axis);
      t.textContent = formatTick(v, false);
    });
    var yticks;
    if (ylog) {
      yticks = [];
      for (var e = Math.ceil(y0); e <= Math.floor(y1); e += 1) { yticks.push(Math.pow(10, e)); }
      if (yticks.length > 7) { yticks = yticks.filter(function (v, i) { return i % 2 === 0; }); }
    } else {
      yticks = niceTicks(y0, y1, 5);
    }
    yticks.forEach(function (v) {
      svg("line", { x1: m.left, x2: m.left + plotW, y1: py(v), y2: py(v), stroke: "#e4e4e4" }, axis);
      var t = svg("text", { x: m.left - 6, y: py(v) + 5, "text-anchor": "end" }, axis);
      t.textContent = formatTick(v, ylog);
    });
    svg("rect", { x: m.left, y: m.top, width: plotW, height: plotH, fill: "none", stroke: "#444" }, axis);
    var xl = svg("text", { x: m.left + plotW / 2, y: height - 10, "text-anchor": "middle" }, axis);
    xl.textContent = spec.xlabel;
    var yl = svg("text", { x: 0, y: 0, "text-anchor": "middle",
      transform: "translate(18," + (m.top + plotH / 2) + ") rotate(-90)" }, axis);
    yl.textContent = spec.ylabel;
    // title from the sliders' current values
    if (spec.title) {
      var title = spec.title.replace(/\{(\w+)\}/g, function (_, name) {
        var slider = spec.sliders.filter(function (s) { return s.name === name; })[0];
        var i = self.index[name];
        return slider.labels ? slider.labels[i] : String(slider.values[i]);
      });
      var tt = svg("text", { x: m.left + plotW / 2, y: 20, "text-anchor": "middle", "font-size": 16, fill: "#222" }, root);
      tt.textContent = title;
    }
    // series
    var plot = svg("g", { "clip-path": "url(#" + clipId + ")" }, root);
    var legend = [];
    var below = 0;  // points under the bottom of the y-range (or zero on a log axis): marked, never dropped silently
    spec.series.forEach(function (series, si) {
      var y = self.frame(series);
      var x = series.x || spec.x;
      var color = series.color || "#1f77b4";
      var points = [];
      var under = 0;
      for (var i = 0; i < x.length; i += 1) {
        if (y[i] === null) { continue; }
        if ((ylog && y[i] <= 0) || fy(y[i]) < y0) {
          under += 1;
          var bx = px(x[i]), by = m.top + plotH;
          svg("path", { d: "M" + (bx - 5).toFixed(1) + "," + (by - 9) + "L" + (bx + 5).toFixed(1) + "," + (by - 9) +
            "L" + bx.toFixed(1) + "," + (by - 1) + "Z", fill: color, "class": "sd-below" }, root);
          continue;
        }
        points.push([px(x[i]), py(y[i])]);
      }
      below += under;
      if (!series.scatter) {
        var d = points.map(function (p, i) { return (i ? "L" : "M") + p[0].toFixed(1) + "," + p[1].toFixed(1); }).join("");
        var attrs = { d: d, fill: "none", stroke: color, "stroke-width": series.width || 1.6,
          "data-series": String(si) };
        if (series.dash) { attrs["stroke-dasharray"] = series.dash; }
        svg("path", attrs, plot);
      }
      if (series.scatter || series.marker) {
        points.forEach(function (p) {
          svg("circle", { cx: p[0].toFixed(1), cy: p[1].toFixed(1), r: series.scatter ? 3.5 : 2.8, fill: color }, plot);
        });
      }
      if (series.label) {
        legend.push(points.length ? series : Object.assign({}, series, { label: series.label + " (below)" }));
      }
    });
    if (below) {
      var note = svg("text", { x: m.left + plotW - 4, y: m.top + plotH - 14, "text-anchor": "end", "font-size": 14,
        fill: "#222", "class": "sd-below-note" }, root);
      note.textContent = "\u25bc below the axis";
    }
    // legend, top right inside the axes
    if (legend.length) {
      var lg = svg("g", { "font-size": 14, fill: "#222" }, root);
      // spec.legend: "top-right" (the default), "top-left" or "bottom-left", inside the axes
      var left = spec.legend === "top-left" || spec.legend === "bottom-left";
      var lw = 126 + (legend.some(function (sr) { return / \(below\)$/.test(sr.label); }) ? 60 : 0);
      var lx = left ? m.left + 10 : m.left + plotW - lw;
      var ly = spec.legend === "bottom-left" ? m.top + plotH - 20 * legend.length - 10 : m.top + 8;
      svg("rect", { x: lx - 6, y: ly - 4, width: lw, height: 20 * legend.length + 6, fill: "#fff",
        "fill-opacity": 0.85, stroke: "#ccc" }, lg);
      legend.forEach(function (series, i) {
        var yy = ly + 10 + 20 * i;
        if (series.scatter) {
          svg("circle", { cx: lx + 12, cy: yy, r: 3.5, fill: series.color }, lg);
        } else {
          var a = { x1: lx, x2: lx + 24, y1: yy, y2: yy, stroke: series.color, "stroke-width": series.width || 1.6 };
          if (series.dash) { a["stroke-dasharray"] = series.dash; }
          svg("line", a, lg);
        }
        var t = svg("text", { x: lx + 30, y: yy + 5 }, lg);
        t.textContent = series.label;
      });
    }
  };

  function setupPlayers() {
    document.querySelectorAll(".sd-player").forEach(function (root) {
      var data = root.querySelector("script[type='application/json']");
      if (!data || root.getAttribute("data-ready")) { return; }
      var spec = JSON.parse(data.textContent);
      var fallback = root.querySelector(".sd-player-fallback");
      if (fallback) { fallback.remove(); }
      new Player(root, spec);
      root.setAttribute("data-ready", "1");
    });
  }

  function setup() {
    setupLightbox();
    setupPlayers();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", setup);
  } else {
    setup();
  }
})();
