(function () {
  var began = performance.now();
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var n = data.counts.length, top = 1, i;
  for (i = 0; i < n; i++) { if (data.counts[i] !== null && data.counts[i] > top) { top = data.counts[i]; } }
  var ns = 'http://www.w3.org/2000/svg', svg = document.getElementById('chart');
  svg.setAttribute('viewBox', '0 0 ' + n + ' 100');
  var y0 = Date.UTC(+data.start.slice(0, 4), +data.start.slice(4, 6) - 1, +data.start.slice(6, 8), +data.start.slice(9, 11));
  var names = {e: 'exported', w: 'exported, counted by window only', m: 'missing'};
  var flags = {z: 'empty', c: 'collapsed'};
  var fragment = document.createDocumentFragment();
  for (i = 0; i < n; i++) {
    var state = data.states[i], flag = data.flags[i], count = data.counts[i];
    var rect = document.createElementNS(ns, 'rect');
    var height = state === 'e' ? Math.max(1.5, 96 * count / top) : 100;
    if (flag !== '-') { height = 100; }
    rect.setAttribute('x', i); rect.setAttribute('width', 1);
    rect.setAttribute('y', 100 - height); rect.setAttribute('height', height);
    var classes = 'hour ' + state + (state === 'm' ? ' missing' : '') + (flag !== '-' ? ' flagged' : '');
    rect.setAttribute('class', classes);
    var label = new Date(y0 + i * 3600000).toISOString().slice(0, 13).replace(/-/g, '');
    var title = document.createElementNS(ns, 'title');
    title.textContent = label + ': ' + (count === null ? 'no count' : count + ' events') + ', ' + names[state] +
      (flag !== '-' ? ', ' + flags[flag] : '');
    rect.appendChild(title);
    fragment.appendChild(rect);
  }
  svg.appendChild(fragment);
  document.getElementById('axis-start').textContent = data.start;
  document.getElementById('axis-end').textContent = new Date(y0 + (n - 1) * 3600000).toISOString().slice(0, 13).replace(/-/g, '');
  document.body.setAttribute('data-render-ms', String(Math.round(performance.now() - began)));
  document.body.setAttribute('data-hours-drawn', String(svg.querySelectorAll('rect.hour').length));
})();
