// A bar chart as inline SVG (no chart library: one chart, a few bars).

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// bars: [{label, value, highlight}]; values may be negative (drawn from a zero line).
export function barChart(bars, { title, width = 560, height = 180 } = {}) {
  const margin = { top: 22, right: 10, bottom: 22, left: 44 };
  const plotWidth = width - margin.left - margin.right;
  const plotHeight = height - margin.top - margin.bottom;
  const top = Math.max(0, ...bars.map((b) => b.value));
  const bottom = Math.min(0, ...bars.map((b) => b.value));
  const span = top - bottom || 1;
  const y = (value) => margin.top + ((top - value) / span) * plotHeight;
  const slot = plotWidth / Math.max(bars.length, 1);
  const chart = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  chart.append(svg("text", { x: margin.left, y: 14 }, title || ""));
  for (const tick of [bottom, (top + bottom) / 2, top]) {
    chart.append(svg("text", { x: margin.left - 6, y: y(tick) + 3, "text-anchor": "end" }, tick.toFixed(2)));
  }
  chart.append(svg("line", { x1: margin.left, x2: width - margin.right, y1: y(0), y2: y(0), stroke: "#999" }));
  bars.forEach((bar, index) => {
    const x = margin.left + index * slot + slot * 0.15;
    const rect = svg("rect", {
      class: bar.highlight ? "bar best" : "bar",
      x, y: Math.min(y(bar.value), y(0)), width: slot * 0.7, height: Math.abs(y(bar.value) - y(0)),
      "data-label": bar.label, "data-value": bar.value,
    });
    rect.append(svg("title", {}, `${bar.label}: ${bar.value.toFixed(3)}`));
    chart.append(rect);
    chart.append(svg("text", { x: x + slot * 0.35, y: height - 6, "text-anchor": "middle" }, bar.label));
  });
  return chart;
}
