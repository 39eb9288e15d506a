/*
 * ds01-alerts: the ds01 service's alerts (retirement warnings) in a banner at
 * the top of JupyterLab.
 *
 * A prebuilt ("federated") JupyterLab 4 extension written by hand: the image
 * is built without node, and the extension needs no shared module. JupyterLab
 * loads this script from <labextensions>/ds01-alerts/package.json's
 * jupyterlab._build.load, calls window._JUPYTERLAB['ds01-alerts'].init(scope)
 * (nothing to share here), then .get('./extension') and calls the factory it
 * resolves to; the module's default export is the list of plugins.
 *
 * The alerts come from the server extension ds01_alerts (GET <baseUrl>ds01/alerts),
 * which reads /workspace/.ds01-alerts: at start, every 30 s and when the tab
 * becomes visible again. Alerts of the last 24 h newer than the newest one
 * dismissed (kept in localStorage, per server) are shown, newest first; Dismiss
 * hides those. The messages are the researcher's own file's text: they go into
 * the page as textContent only.
 */
(function () {
  'use strict';

  var NAME = 'ds01-alerts';
  var POLL_MS = 30000;
  var MAX_AGE_MS = 24 * 3600 * 1000;
  var MAX_SHOWN = 3;
  var TIME = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/;
  var LEVELS = { warning: 'Warning', retired: 'Retired', info: 'Notice' };
  var STYLE = [
    '#ds01-alerts-banner { position: fixed; top: 0; left: 0; right: 0; z-index: 10000;',
    '  box-sizing: border-box; display: flex; align-items: flex-start; gap: 12px;',
    '  padding: 6px 12px; font-family: var(--jp-ui-font-family, sans-serif);',
    '  font-size: var(--jp-ui-font-size1, 13px); line-height: 1.4;',
    '  color: #5c4300; background: #fff3cd; border-bottom: 1px solid #e0b84c; }',
    '#ds01-alerts-banner[hidden] { display: none; }',
    '#ds01-alerts-banner.ds01-level-retired { color: #6f1d1b; background: #f8d7da;',
    '  border-bottom-color: #d98e94; }',
    '#ds01-alerts-banner.ds01-level-info { color: #0b4a5a; background: #d8f1f7;',
    '  border-bottom-color: #8fcfdf; }',
    '#ds01-alerts-banner .ds01-alerts-list { flex: 1; min-width: 0; overflow-wrap: anywhere; }',
    '#ds01-alerts-banner .ds01-alert-level { font-weight: bold; margin-right: 0.5em; }',
    '#ds01-alerts-banner .ds01-alerts-more { opacity: 0.8; }',
    '#ds01-alerts-banner .ds01-alerts-dismiss { flex: none; cursor: pointer;',
    '  font: inherit; padding: 1px 10px; color: inherit; background: transparent;',
    '  border: 1px solid currentColor; border-radius: 3px; }'
  ].join('\n');

  function pageConfig() {
    var el = document.getElementById('jupyter-config-data');
    try {
      return (el && JSON.parse(el.textContent || '{}')) || {};
    } catch (e) {
      return {};
    }
  }

  /* "Is a newer than b": by time, then by place among the lines with that time. */
  function newer(a, b) {
    return !b || a.time > b.time || (a.time === b.time && a.nth > b.nth);
  }

  /* Well-formed alerts only, each with its place (nth) among those of its time. */
  function validAlerts(body) {
    var list = body && Array.isArray(body.alerts) ? body.alerts : [];
    var seen = {};
    var out = [];
    list.forEach(function (a) {
      if (!a || typeof a.time !== 'string' || !TIME.test(a.time)) return;
      if (!Object.prototype.hasOwnProperty.call(LEVELS, a.level)) return;
      if (typeof a.message !== 'string' || !a.message) return;
      seen[a.time] = (seen[a.time] || 0) + 1;
      out.push({ time: a.time, nth: seen[a.time], level: a.level, message: a.message });
    });
    return out;
  }

  function Banner(baseUrl, token) {
    this.url = new URL('ds01/alerts', new URL(baseUrl || '/', window.location.href)).href;
    this.token = token || '';
    this.key = NAME + ':dismissed:' + (baseUrl || '/');
    this.alerts = [];
    this.hiddenUpTo = null; // dismissed in this page, even where localStorage is not kept
    this.shownKey = '';
    this.busy = false;
    this.node = null;
  }

  Banner.prototype.dismissed = function () {
    try {
      var d = JSON.parse(window.localStorage.getItem(this.key) || 'null');
      if (d && typeof d.time === 'string' && typeof d.nth === 'number') return d;
    } catch (e) {
      /* no storage, or not ours: nothing dismissed */
    }
    return null;
  };

  Banner.prototype.dismiss = function () {
    var newest = this.alerts.reduce(function (n, a) {
      return newer(a, n) ? a : n;
    }, null);
    if (newest) {
      try {
        window.localStorage.setItem(this.key, JSON.stringify({ time: newest.time, nth: newest.nth }));
      } catch (e) {
        /* not remembered: hidden until the next page load */
      }
    }
    this.hiddenUpTo = newest;
    this.render();
  };

  Banner.prototype.pending = function () {
    var dismissed = this.dismissed();
    var hiddenUpTo = this.hiddenUpTo;
    var oldest = new Date(Date.now() - MAX_AGE_MS).toISOString().slice(0, 19) + 'Z';
    return this.alerts.filter(function (a) {
      return a.time >= oldest && newer(a, dismissed) && newer(a, hiddenUpTo);
    });
  };

  Banner.prototype.poll = async function () {
    if (this.busy) return;
    this.busy = true;
    try {
      var headers = this.token ? { Authorization: 'token ' + this.token } : {};
      var r = await fetch(this.url, { headers: headers, credentials: 'same-origin', cache: 'no-store' });
      if (r.ok) {
        this.alerts = validAlerts(await r.json());
        this.render();
        this.makeRoom();
      }
    } catch (e) {
      /* server away, or logged out: try again at the next poll */
    } finally {
      this.busy = false;
    }
  };

  Banner.prototype.build = function () {
    var style = document.createElement('style');
    style.textContent = STYLE;
    document.head.appendChild(style);
    var node = document.createElement('div');
    node.id = 'ds01-alerts-banner';
    node.setAttribute('role', 'status');
    node.hidden = true;
    var list = document.createElement('div');
    list.className = 'ds01-alerts-list';
    var button = document.createElement('button');
    button.type = 'button';
    button.className = 'ds01-alerts-dismiss';
    button.textContent = 'Dismiss';
    button.title = 'Hide these alerts (new ones will show)';
    button.addEventListener('click', this.dismiss.bind(this));
    node.appendChild(list);
    node.appendChild(button);
    document.body.appendChild(node);
    this.node = node;
    this.list = list;
  };

  Banner.prototype.render = function () {
    var pending = this.pending();
    var key = JSON.stringify(pending);
    if (key === this.shownKey) return;
    this.shownKey = key;
    var list = this.list;
    while (list.firstChild) list.removeChild(list.firstChild);
    var shown = pending.slice(-MAX_SHOWN).reverse();
    shown.forEach(function (a) {
      var row = document.createElement('div');
      row.className = 'ds01-alert ds01-level-' + a.level;
      var level = document.createElement('span');
      level.className = 'ds01-alert-level';
      level.textContent = LEVELS[a.level] + ':';
      var message = document.createElement('span');
      message.className = 'ds01-alert-message';
      message.textContent = a.message;
      row.appendChild(level);
      row.appendChild(message);
      list.appendChild(row);
    });
    if (pending.length > shown.length) {
      var more = document.createElement('div');
      more.className = 'ds01-alerts-more';
      more.textContent =
        (pending.length - shown.length) + ' earlier alert(s): see /workspace/.ds01-alerts';
      list.appendChild(more);
    }
    this.node.className = shown.length ? 'ds01-level-' + shown[0].level : '';
    this.node.hidden = !shown.length;
    this.makeRoom();
  };

  /* Move JupyterLab's shell (#main) below the banner while it shows, so that its menu
   * bar stays usable; JupyterLab lays itself out again on the window's resize. */
  Banner.prototype.makeRoom = function () {
    var shell = document.getElementById('main');
    var top = this.node.hidden ? '' : this.node.offsetHeight + 'px';
    if (!shell || shell.style.top === top) return;
    shell.style.top = top;
    window.dispatchEvent(new Event('resize'));
  };

  Banner.prototype.start = function () {
    var self = this;
    this.build();
    this.poll();
    // a hidden tab does not ask: like JupyterLab's own polls, whose requests (through
    // the hub's proxy) count as activity and would keep an idle server from retiring
    window.setInterval(function () {
      if (document.visibilityState === 'visible') self.poll();
    }, POLL_MS);
    document.addEventListener('visibilitychange', function () {
      if (document.visibilityState === 'visible') self.poll();
    });
    window.addEventListener('storage', function (e) {
      if (e.key === self.key) self.render(); // dismissed in another tab
    });
    window.addEventListener('resize', function (e) {
      if (e.isTrusted && !self.node.hidden) self.makeRoom();
    });
  };

  var plugin = {
    id: NAME + ':banner',
    description: 'Shows the ds01 service alerts (retirement warnings) in a banner.',
    autoStart: true,
    requires: [],
    activate: function (app) {
      // Once the shell is in the page (app.started), so that it can make room.
      Promise.resolve(app && app.started)
        .then(function () {
          var config = pageConfig();
          new Banner(config.baseUrl, config.token).start();
        })
        .catch(function (e) {
          console.warn(NAME + ': no alerts banner', e);
        });
    }
  };

  var container = {
    init: function () {
      return Promise.resolve(); // shares nothing, needs nothing
    },
    get: function (module) {
      if (module !== './extension') {
        return Promise.reject(new Error(NAME + ': no module ' + module));
      }
      return Promise.resolve(function () {
        return { __esModule: true, default: [plugin] };
      });
    }
  };

  window._JUPYTERLAB = window._JUPYTERLAB || {};
  window._JUPYTERLAB[NAME] = container;
})();
