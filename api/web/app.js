// Embassy KMS: the security officers' page. A client of the JSON API like any other: every
// datum comes from /v1 with the officer's token. Everything inserted into the page is built
// with textContent and createElement, never innerHTML, so text from the service (display
// names, notes, denial reasons a caller chose) can never become markup. The token is kept in
// memory and sessionStorage (this tab only), never in localStorage, a cookie or a URL.
"use strict";

(() => {
  const TOKEN_KEY = "ekms.session";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const TREE_HEAD_TYPE = "ekms-sth+jwt";
  const MAX_KEY_FILE = 64 * 1024;
  const ASSERTION_TTL = 60;

  const state = {
    token: null, // the bearer token, in memory
    own: false, // obtained by this page's key sign-in, so sign-out revokes it
    self: null, // lookup-self data
    expiryTimer: null,
    generation: 0, // bumped on every navigation, so a late answer never paints another view
    audit: { before: null, newer: [], rows: new Map(), next: null },
    campaign: null,
    pendingRevoke: null,
  };

  // --- DOM helpers ---------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "className") node.setAttribute("class", value);
      else if (name.startsWith("on") || name === "style") throw new Error(`refused attribute ${name}`);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
  }

  function append(node, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function clear(node) {
    node.replaceChildren();
    return node;
  }

  function fmtTime(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return "";
    const iso = new Date(Number(seconds) * 1000).toISOString();
    return `${iso.slice(0, 10)} ${iso.slice(11, 19)}Z`;
  }

  function fmtList(values) {
    return Array.isArray(values) ? values.join(", ") : "";
  }

  /** A datetime-local value read as UTC, as seconds since the epoch; "" when empty. */
  function utcSeconds(input) {
    const value = input.value.trim();
    if (!value) return "";
    const text = value.length === 16 ? `${value}:00Z` : `${value}Z`;
    const millis = Date.parse(text);
    if (!Number.isFinite(millis)) throw new UserError(`${input.id}: not a date and time`);
    return String(Math.floor(millis / 1000));
  }

  function badge(text, kind) {
    return el("span", { className: `badge badge-${kind || text}`, text });
  }

  // --- messages --------------------------------------------------------------------------

  class UserError extends Error {}

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function showError(error) {
    const box = $("message");
    let text;
    if (error instanceof ApiError) text = `${error.status}: ${error.message}`;
    else if (error instanceof UserError) text = error.message;
    else text = `Unexpected problem in the page: ${error && error.message ? error.message : error}`;
    box.textContent = text;
    box.hidden = false;
    $("notice").hidden = true;
  }

  function showNotice(text) {
    $("notice").textContent = text;
    $("notice").hidden = false;
    $("message").hidden = true;
  }

  function clearMessages() {
    $("message").hidden = true;
    $("notice").hidden = true;
  }

  // --- the API ---------------------------------------------------------------------------

  async function api(method, path, { query, body, raw, anonymous } = {}) {
    const url = new URL(path, window.location.origin);
    for (const [name, value] of Object.entries(query || {})) {
      if (value !== "" && value !== null && value !== undefined) url.searchParams.set(name, value);
    }
    const headers = { Accept: raw ? "*/*" : "application/json" };
    if (!anonymous) {
      if (!state.token) throw new UserError("Sign in first.");
      headers.Authorization = `Bearer ${state.token}`;
    }
    const init = { method, headers, credentials: "omit", cache: "no-store", redirect: "error" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (error) {
      throw new UserError(`The service did not answer (${error.message}).`);
    }
    if (!response.ok) {
      let message = response.statusText || "request failed";
      try {
        const problem = await response.json();
        if (problem && Array.isArray(problem.errors) && problem.errors.length) {
          message = problem.errors.join("; ");
        }
      } catch {
        // not JSON: keep the status text
      }
      if (response.status === 401 && !anonymous) endSession(`Your session ended: ${message}`);
      throw new ApiError(response.status, message);
    }
    if (raw) return response;
    if (response.status === 204) return null;
    return response.json();
  }

  // --- base64url, hashing, signatures ------------------------------------------------------

  const encoder = new TextEncoder();

  function b64url(bytes) {
    let text = "";
    for (const b of bytes) text += String.fromCharCode(b);
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function b64urlDecode(text) {
    if (!/^[A-Za-z0-9_-]*$/.test(text)) throw new Error("not base64url");
    const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
    const binary = atob(padded);
    return Uint8Array.from(binary, (c) => c.charCodeAt(0));
  }

  function hexToBytes(hex) {
    if (typeof hex !== "string" || !/^([0-9a-f]{2})*$/.test(hex)) throw new Error("not hex");
    const out = new Uint8Array(hex.length / 2);
    for (let i = 0; i < out.length; i += 1) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
    return out;
  }

  function bytesToHex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function equalBytes(a, b) {
    if (a.length !== b.length) return false;
    let diff = 0;
    for (let i = 0; i < a.length; i += 1) diff |= a[i] ^ b[i];
    return diff === 0;
  }

  async function sha256(...parts) {
    const total = parts.reduce((n, p) => n + p.length, 0);
    const joined = new Uint8Array(total);
    let at = 0;
    for (const p of parts) {
      joined.set(p, at);
      at += p.length;
    }
    return new Uint8Array(await crypto.subtle.digest("SHA-256", joined));
  }

  // RFC 9162 section 2.1.1: leaves and interior nodes hashed under different prefixes.
  const leafHash = (data) => sha256(Uint8Array.of(0), data);
  const nodeHash = (left, right) => sha256(Uint8Array.of(1), left, right);

  /**
   * RFC 9162 section 2.1.3.2, as kms/merkle.py verify_inclusion: the root the audit path leads
   * to, or null if the path cannot belong to a tree of that size. Plain arithmetic rather than
   * bit operators, which JavaScript limits to 32 bits.
   */
  async function rootFromInclusion(leaf, index, size, proof) {
    if (!Number.isSafeInteger(index) || !Number.isSafeInteger(size) || index < 0 || index >= size) {
      return null;
    }
    const odd = (n) => n % 2 === 1;
    const half = (n) => Math.floor(n / 2);
    let fn = index;
    let sn = size - 1;
    let r = leaf;
    for (const p of proof) {
      if (sn === 0) return null;
      if (odd(fn) || fn === sn) {
        r = await nodeHash(p, r);
        if (!odd(fn)) {
          while (!(odd(fn) || fn === 0)) {
            fn = half(fn);
            sn = half(sn);
          }
        }
      } else {
        r = await nodeHash(r, p);
      }
      fn = half(fn);
      sn = half(sn);
    }
    return sn === 0 ? r : null;
  }

  /**
   * RFC 8785 canonical JSON for what an audit record holds (objects, arrays, strings, safe
   * integers, booleans, null), the bytes the log hashed (kms/canonical.py). JSON.stringify
   * already escapes as JCS requires, and sorting strings compares UTF-16 code units, as JCS
   * orders keys.
   */
  function canonicalJson(value) {
    if (value === null || typeof value === "boolean" || typeof value === "string") {
      return JSON.stringify(value);
    }
    if (typeof value === "number") {
      if (!Number.isSafeInteger(value)) throw new Error("a record holds a number that is not a safe integer");
      return JSON.stringify(value);
    }
    if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
    if (typeof value === "object") {
      const keys = Object.keys(value).sort();
      return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`).join(",")}}`;
    }
    throw new Error(`a record holds a value of type ${typeof value}`);
  }

  async function signJws(header, claims, signer) {
    const input = `${b64url(encoder.encode(JSON.stringify(header)))}.${b64url(encoder.encode(JSON.stringify(claims)))}`;
    const signature = new Uint8Array(
      await crypto.subtle.sign(signer.params, signer.key, encoder.encode(input)),
    );
    return `${input}.${b64url(signature)}`;
  }

  // --- private keys ------------------------------------------------------------------------

  const EC = { name: "ECDSA", namedCurve: "P-256" };
  const ES256 = { name: "ECDSA", hash: "SHA-256" };
  const ED = { name: "Ed25519" };

  /**
   * The officer's private key as a non-extractable CryptoKey: a private JWK (EC P-256 or
   * Ed25519, with "d") or an unencrypted PKCS#8 PEM, as KeyHolder.private_pem writes them.
   */
  async function importPrivateKey(text) {
    const trimmed = text.trim();
    if (trimmed.startsWith("{")) {
      let jwk;
      try {
        jwk = JSON.parse(trimmed);
      } catch {
        throw new UserError("The key file is not valid JSON.");
      }
      if (typeof jwk !== "object" || jwk === null || Array.isArray(jwk)) {
        throw new UserError("The key file must hold one JWK object.");
      }
      if (typeof jwk.d !== "string") {
        throw new UserError("The key file holds no private key (a JWK without \"d\"): choose the private key file.");
      }
      try {
        if (jwk.kty === "EC" && jwk.crv === "P-256") {
          const clean = { kty: "EC", crv: "P-256", x: jwk.x, y: jwk.y, d: jwk.d };
          const key = await crypto.subtle.importKey("jwk", clean, EC, false, ["sign"]);
          return { key, params: ES256, alg: "ES256" };
        }
        if (jwk.kty === "OKP" && jwk.crv === "Ed25519") {
          const clean = { kty: "OKP", crv: "Ed25519", x: jwk.x, d: jwk.d };
          const key = await crypto.subtle.importKey("jwk", clean, ED, false, ["sign"]);
          return { key, params: ED, alg: "EdDSA" };
        }
      } catch (error) {
        throw new UserError(`The browser refused the key (${error.name}).`);
      }
      throw new UserError("The key must be EC P-256 (ES256) or Ed25519 (EdDSA).");
    }
    if (trimmed.includes("-----BEGIN ENCRYPTED PRIVATE KEY-----")) {
      throw new UserError(
        "Password-protected key files cannot be opened in the page: run `ekms login` and paste its token.",
      );
    }
    const pem = /-----BEGIN PRIVATE KEY-----([A-Za-z0-9+/=\s]+)-----END PRIVATE KEY-----/.exec(trimmed);
    if (!pem) {
      throw new UserError(
        "The key file must be a private JWK (JSON) or a PKCS#8 PEM (\"BEGIN PRIVATE KEY\"); convert others with `openssl pkcs8 -topk8 -nocrypt`.",
      );
    }
    const der = Uint8Array.from(atob(pem[1].replace(/\s+/g, "")), (c) => c.charCodeAt(0));
    try {
      const key = await crypto.subtle.importKey("pkcs8", der, EC, false, ["sign"]);
      return { key, params: ES256, alg: "ES256" };
    } catch {
      try {
        const key = await crypto.subtle.importKey("pkcs8", der, ED, false, ["sign"]);
        return { key, params: ED, alg: "EdDSA" };
      } catch {
        throw new UserError("The key must be EC P-256 (ES256) or Ed25519 (EdDSA).");
      }
    }
  }

  // --- the session -------------------------------------------------------------------------

  function audience() {
    return $("signin-audience").value.trim();
  }

  async function signInWithKey() {
    const principal = $("signin-principal").value.trim();
    const input = $("signin-keyfile");
    const file = input.files && input.files[0];
    if (!principal) throw new UserError("Enter your principal id.");
    if (!file) throw new UserError("Choose your private key file.");
    if (file.size > MAX_KEY_FILE) throw new UserError("That file is too large to be a key.");
    if (!audience()) throw new UserError("The audience is empty.");
    const signer = await importPrivateKey(await file.text());
    input.value = "";
    const now = Math.floor(Date.now() / 1000);
    const claims = {
      iss: principal,
      sub: principal,
      aud: audience(),
      iat: now,
      exp: now + ASSERTION_TTL,
      jti: crypto.randomUUID(),
    };
    const assertion = await signJws({ alg: signer.alg, typ: "JWT" }, claims, signer);
    const answer = await api("POST", "/v1/auth/jwt/login", { body: { jwt: assertion }, anonymous: true });
    await startSession(answer.auth.client_token, true);
  }

  async function signInWithToken() {
    const input = $("signin-token");
    const token = input.value.trim();
    input.value = "";
    if (!token) throw new UserError("Paste a token.");
    if (/\s/.test(token) || token.length > 8192) throw new UserError("That does not look like a token.");
    await startSession(token, false);
  }

  async function startSession(token, own) {
    state.token = token;
    state.own = own;
    try {
      const answer = await api("GET", "/v1/auth/token/lookup-self");
      state.self = answer.data;
    } catch (error) {
      forget();
      throw error;
    }
    sessionStorage.setItem(TOKEN_KEY, JSON.stringify({ token, own }));
    showSession();
    clearMessages();
    if (!window.location.hash || window.location.hash === "#/signin") {
      window.location.hash = "#/dashboard";
    } else {
      route();
    }
  }

  function selfId() {
    return state.self && state.self.entity_id ? state.self.entity_id : null;
  }

  function showSession() {
    const self = state.self || {};
    $("who").textContent = self.entity_id || self.display_name || "token";
    $("who-roles").textContent = fmtList(self.policies);
    $("who-expiry").textContent = self.expire_time ? `until ${fmtTime(self.expire_time)}` : "";
    $("session").hidden = false;
    $("nav").hidden = false;
    clearTimeout(state.expiryTimer);
    if (self.expire_time) {
      const left = self.expire_time * 1000 - Date.now();
      state.expiryTimer = setTimeout(() => endSession("Your token expired: sign in again."), Math.max(0, left));
    }
  }

  /** Drop the token and everything shown with it. */
  function forget() {
    state.token = null;
    state.own = false;
    state.self = null;
    state.campaign = null;
    state.audit = { before: null, newer: [], rows: new Map(), next: null };
    clearTimeout(state.expiryTimer);
    sessionStorage.removeItem(TOKEN_KEY);
    for (const id of ["report-counts", "report-sections", "report-meta", "campaign-list", "worklist",
      "campaign-facts", "campaign-id", "audit-table", "audit-meta", "audit-record-json",
      "audit-proof-status", "usage-charts", "usage-meta", "who", "who-roles", "who-expiry"]) {
      clear($(id));
    }
    for (const form of document.querySelectorAll("main form:not(.card)")) form.reset();
    for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
    $("audit-detail").hidden = true;
    $("session").hidden = true;
    $("nav").hidden = true;
  }

  function endSession(message) {
    forget();
    route();
    if (message) showError(new UserError(message));
  }

  async function signOut() {
    const accessor = state.self && state.self.accessor;
    if (state.own && accessor) {
      try {
        await api("POST", `/v1/ekms/tokens/${encodeURIComponent(accessor)}/revoke`);
      } catch {
        // the token still expires by itself; signing out goes on
      }
    }
    forget();
    window.location.hash = "#/signin";
    route();
    showNotice("Signed out.");
  }

  // --- routing -----------------------------------------------------------------------------

  const VIEWS = ["signin", "dashboard", "campaigns", "campaign", "audit", "usage"];

  function showView(name) {
    for (const view of VIEWS) $(`view-${view}`).hidden = view !== name;
    for (const link of document.querySelectorAll("#nav a")) {
      const current = link.dataset.view === name || (name === "campaign" && link.dataset.view === "campaigns");
      if (current) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  function route() {
    state.generation += 1;
    if (!state.token) {
      showView("signin");
      return;
    }
    const parts = (window.location.hash || "#/dashboard").replace(/^#\/?/, "").split("/");
    const run = (promise) => promise.catch(showError);
    switch (parts[0]) {
      case "campaigns":
        if (parts[1]) {
          showView("campaign");
          run(Promise.resolve().then(() => loadCampaign(decodeURIComponent(parts[1]))));
        } else {
          showView("campaigns");
          run(loadCampaigns());
        }
        break;
      case "audit":
        showView("audit");
        run(loadAudit());
        break;
      case "usage":
        showView("usage");
        run(loadUsage());
        break;
      default:
        showView("dashboard");
        run(loadReport());
    }
  }

  /** A check that the officer has not navigated since a load began, so a late answer is dropped. */
  function current() {
    const generation = state.generation;
    return () => generation === state.generation;
  }

  // --- tables --------------------------------------------------------------------------------

  /** columns: [title, row => text or Node]. */
  function table(columns, rows, testid, rowId) {
    if (!rows.length) return el("p", { className: "muted empty", text: "None.", "data-testid": testid });
    const head = el("tr", {}, columns.map(([title]) => el("th", { text: title })));
    const body = rows.map((row) => el(
      "tr",
      rowId ? { "data-testid": rowId(row) } : {},
      columns.map(([, cell]) => {
        const value = cell(row);
        return el("td", {}, value instanceof Node ? value : String(value ?? ""));
      }),
    ));
    return el("table", { "data-testid": testid }, el("thead", {}, head), el("tbody", {}, body));
  }

  // --- dashboard -----------------------------------------------------------------------------

  function reportQuery() {
    return {
      since: utcSeconds($("report-since")),
      until: utcSeconds($("report-until")),
      principal: $("report-principal").value.trim(),
      dataset: $("report-dataset").value.trim(),
      site: $("report-site").value.trim(),
      dormant_days: $("report-dormant").value.trim(),
    };
  }

  async function loadReport() {
    const fresh = current();
    const answer = await api("GET", "/v1/ekms/review/report", { query: reportQuery() });
    if (fresh()) renderReport(answer.data);
  }

  async function downloadCsv(section) {
    const query = { ...reportQuery(), format: "csv", section };
    const response = await api("GET", "/v1/ekms/review/report", { query, raw: true });
    const blob = await response.blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: `ekms-review-${section}.csv` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  }

  function section(title, csvName, ...content) {
    const heading = el("h3", {}, title);
    if (csvName) {
      const button = el("button", { type: "button", className: "small", "data-testid": `csv-${csvName}`, text: "CSV" });
      button.addEventListener("click", () => downloadCsv(csvName).catch(showError));
      heading.append(" ", button);
    }
    return el("section", { className: "report-section", "data-testid": `section-${csvName || title}` }, heading, content);
  }

  function renderReport(report) {
    const principals = report.principals || [];
    const grants = report.grants || [];
    const denials = report.denials || { total: 0, listed: [], truncated: false };
    const emergencies = report.emergencies || [];
    const dormantPrincipals = principals.filter((p) => p.dormant);
    const dormantGrants = grants.filter((g) => g.dormant);
    const counts = [
      ["Principals", principals.length, "principals"],
      ["Dormant principals", dormantPrincipals.length, "dormant-principals"],
      ["Grants", grants.length, "grants"],
      ["Dormant grants", dormantGrants.length, "dormant-grants"],
      ["Unused keys", (report.unused_keys || []).length, "unused-keys"],
      ["Denials", denials.total, "denials"],
      ["Active emergencies", emergencies.filter((e) => e.status === "active").length, "emergencies"],
      ["Officials", (report.officials || []).length, "officials"],
    ];
    clear($("report-counts")).append(...counts.map(([label, n, id]) => el(
      "div", { className: "count", "data-testid": `count-${id}` },
      el("span", { className: "count-n", text: n }), el("span", { className: "count-label", text: label }),
    )));
    const skipped = report.skipped_records ? ` ${report.skipped_records} audit record(s) without a time or operation were skipped.` : "";
    $("report-meta").textContent = `Generated ${fmtTime(report.generated_at)}; dormant after ${report.filters ? report.filters.dormant_after_days : "?"} days.${skipped}`;

    const principalColumns = [
      ["Principal", (p) => p.id],
      ["Name", (p) => p.display_name],
      ["Roles", (p) => fmtList(p.roles)],
      ["Created", (p) => `${fmtTime(p.created_at)} by ${p.created_by}`],
      ["Last use", (p) => fmtTime(p.last_use) || "never"],
      ["State", (p) => (p.disabled_at ? badge("disabled") : p.dormant ? badge("dormant") : badge("active"))],
    ];
    const grantColumns = [
      ["Grant", (g) => g.id],
      ["State", (g) => badge(g.state)],
      ["Requester", (g) => g.requester],
      ["Tool", (g) => g.tool],
      ["Datasets", (g) => fmtList(g.datasets)],
      ["Site", (g) => g.site],
      ["Approvers", (g) => (g.approvers || []).map((a) => a.official).join(", ")],
      ["Uses", (g) => (g.max_uses === null ? `${g.uses}` : `${g.uses} / ${g.max_uses}`)],
      ["Credentials", (g) => `${g.credentials_issued} issued, ${g.credentials_revoked} revoked`],
      ["Window", (g) => (g.window_open ? `open until ${fmtTime(g.window_end)}` : "closed")],
      ["Last use", (g) => fmtTime(g.last_use) || "never"],
    ];
    const denialNote = denials.truncated ? el("p", { className: "muted", text: `Showing the newest ${denials.listed.length} of ${denials.total}.` }) : null;
    clear($("report-sections")).append(
      section("Principals", "principals", table(principalColumns, principals, "table-principals", (p) => `principal-${p.id}`)),
      section(
        "Dormant principals and grants", null,
        table(principalColumns, dormantPrincipals, "table-dormant-principals"),
        table(grantColumns, dormantGrants, "table-dormant-grants"),
      ),
      section("Grants", "grants", table(grantColumns, grants, "table-grants")),
      section("Credentials and unwraps", "usage", table([
        ["Principal", (u) => u.principal ?? ""],
        ["Dataset", (u) => u.dataset ?? ""],
        ["Site", (u) => u.site ?? ""],
        ["Issued", (u) => u.issued],
        ["Used", (u) => u.used],
        ["Denied", (u) => u.denied],
      ], report.usage || [], "table-usage")),
      section("Unused keys", "unused-keys", table([["Key", (k) => k]], report.unused_keys || [], "table-unused-keys")),
      section("Recent denials", "denials", denialNote, table([
        ["Time", (d) => fmtTime(d.time)],
        ["Principal", (d) => d.principal ?? ""],
        ["Operation", (d) => d.operation],
        ["Key", (d) => d.key ?? ""],
        ["Status", (d) => d.status ?? ""],
        ["Reason", (d) => d.reason ?? ""],
        ["Request", (d) => d.request_id],
      ], denials.listed || [], "table-denials")),
      section("Emergencies", "emergencies", table([
        ["Proposal", (e) => e.proposal_id],
        ["Declared by", (e) => e.declared_by],
        ["Approvers", (e) => (e.approvers || []).map((a) => a.official).join(", ")],
        ["Justification", (e) => e.justification],
        ["Declared", (e) => fmtTime(e.declared_at)],
        ["Scheduled end", (e) => fmtTime(e.scheduled_end)],
        ["Status", (e) => badge(e.status)],
        ["Ended", (e) => (e.ended_at ? `${fmtTime(e.ended_at)}${e.ended_by ? ` by ${e.ended_by}` : ""}` : "")],
      ], emergencies, "table-emergencies")),
      section("Officials' share activity", "officials", table([
        ["Official", (o) => o.official],
        ["Share events", (o) => o.share_events_total],
        ["Latest share events", (o) => (o.share_events || []).slice(0, 3)
          .map((s) => `${fmtTime(s.time)} ${s.operation} (${s.decision})`).join("; ")],
        ["Approvals", (o) => o.approvals],
        ["Denials", (o) => o.denials],
        ["Last decision", (o) => fmtTime(o.last_decision)],
      ], report.officials || [], "table-officials")),
    );
  }

  // --- campaigns -----------------------------------------------------------------------------

  async function loadCampaigns() {
    const fresh = current();
    const answer = await api("GET", "/v1/ekms/review/campaigns");
    if (!fresh()) return;
    const campaigns = (answer.data && answer.data.campaigns) || [];
    clear($("campaign-list")).append(table([
      ["Campaign", (c) => el("a", { href: `#/campaigns/${encodeURIComponent(c.id)}`, "data-testid": `campaign-link-${c.id}`, text: c.id })],
      ["State", (c) => badge(c.state)],
      ["Opened by", (c) => c.opened_by],
      ["Opened", (c) => fmtTime(c.opened_at)],
      ["Closes", (c) => fmtTime(c.closes_at)],
      ["Pending", (c) => c.pending],
      ["Certified", (c) => c.certified],
      ["Revoked", (c) => c.revoked],
    ], campaigns, "table-campaigns", (c) => `campaign-${c.id}`));
  }

  async function openCampaign() {
    const duration = $("campaign-duration").value.trim();
    if (!duration) throw new UserError("Enter how long the campaign stays open, such as 72h.");
    const scope = $("campaign-scope").value.split(",").map((s) => s.trim()).filter(Boolean);
    const body = scope.length ? { duration, scope } : { duration };
    const answer = await api("POST", "/v1/ekms/review/campaigns", { body });
    const data = answer.data || {};
    const id = data.id || (data.campaign && data.campaign.id);
    showNotice(`Opened campaign ${id}.`);
    window.location.hash = `#/campaigns/${encodeURIComponent(id)}`;
  }

  const campaignPath = (id) => `/v1/ekms/review/campaigns/${encodeURIComponent(id)}`;

  async function loadCampaign(id) {
    const fresh = current();
    const answer = await api("GET", campaignPath(id));
    if (fresh()) renderCampaign(answer.data);
  }

  function renderCampaign(view) {
    const campaign = view.campaign;
    const principals = view.principals || {};
    state.campaign = view;
    const open = campaign.state === "open";
    $("campaign-id").textContent = campaign.id;
    const facts = [
      ["State", campaign.state],
      ["Opened", `${fmtTime(campaign.opened_at)} by ${campaign.opened_by}`],
      ["Closes", fmtTime(campaign.closes_at)],
      ["Scope", campaign.scope ? fmtList(campaign.scope) : "every active principal at opening"],
    ];
    if (campaign.closed_at) facts.push(["Closed", `${fmtTime(campaign.closed_at)} by ${campaign.closed_by}`]);
    clear($("campaign-facts")).append(...facts.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]));
    $("campaign-facts").dataset.state = campaign.state;
    const me = selfId();
    const ids = Object.keys(campaign.items).sort();
    $("campaign-self-note").hidden = !(open && me && ids.includes(me));
    const rows = ids.map((id) => ({ id, item: campaign.items[id], who: principals[id] || {} }));
    clear($("worklist")).append(table([
      ["Principal", (r) => r.id],
      ["Name", (r) => r.who.display_name ?? ""],
      ["Roles", (r) => fmtList(r.who.roles)],
      ["Account", (r) => (r.who.active === false ? badge("disabled") : badge("active"))],
      ["Review", (r) => el("span", { className: `badge badge-${r.item.state}`, "data-testid": `item-state-${r.id}`, text: r.item.state })],
      ["Decided by", (r) => el("span", { "data-testid": `item-decided-by-${r.id}`, text: r.item.decided_by ?? "" })],
      ["Decided", (r) => fmtTime(r.item.decided_at)],
      ["Note", (r) => r.item.note],
      ["", (r) => actions(campaign, r.id, r.item, me)],
    ], rows, "table-worklist", (r) => `worklist-row-${r.id}`));
    $("campaign-close").hidden = !open;
  }

  function actions(campaign, principal, item, me) {
    if (campaign.state !== "open" || item.state !== "pending") return "";
    const own = principal === me;
    const certify = el("button", { type: "button", className: "small", "data-testid": `certify-${principal}`, text: "Certify", disabled: own });
    const revoke = el("button", { type: "button", className: "small danger", "data-testid": `revoke-${principal}`, text: "Revoke", disabled: own });
    if (own) {
      const why = "You cannot decide your own access review: another security officer must.";
      certify.title = why;
      revoke.title = why;
      return el("span", { className: "actions" }, certify, revoke,
        el("span", { className: "muted small-text", "data-testid": `own-row-${principal}`, text: "your own review: another officer decides" }));
    }
    certify.addEventListener("click", () => decide(campaign.id, principal, "certify", "").catch(showError));
    revoke.addEventListener("click", () => askRevoke(campaign.id, principal));
    return el("span", { className: "actions" }, certify, revoke);
  }

  async function decide(campaignId, principal, verb, note) {
    clearMessages();
    for (const button of document.querySelectorAll("#worklist button")) button.disabled = true;
    try {
      await api("POST", `${campaignPath(campaignId)}/${verb}`, { body: { principal, note } });
      showNotice(`${verb === "certify" ? "Certified" : "Revoked"} ${principal}.`);
    } finally {
      await loadCampaign(campaignId);
    }
  }

  function askRevoke(campaignId, principal) {
    state.pendingRevoke = { campaignId, principal };
    $("revoke-principal").textContent = principal;
    $("revoke-note").value = "";
    $("revoke-dialog").showModal();
    $("revoke-note").focus();
  }

  async function confirmRevoke() {
    const pending = state.pendingRevoke;
    const note = $("revoke-note").value.trim();
    if (!note) throw new UserError("A revocation needs a note saying why.");
    $("revoke-dialog").close();
    state.pendingRevoke = null;
    await decide(pending.campaignId, pending.principal, "revoke", note);
  }

  async function askClose() {
    const id = state.campaign && state.campaign.campaign.id;
    if (!id) return;
    const answer = await api("GET", campaignPath(id));
    renderCampaign(answer.data);
    const items = answer.data.campaign.items;
    const principals = answer.data.principals || {};
    // Officials stay active whatever the review says: removing one takes their quorum.
    const official = (p) => (principals[p] && principals[p].roles || []).includes("official");
    const ids = Object.keys(items).sort();
    const list = (names) => (names.length
      ? names.map((p) => el("li", { text: p }))
      : [el("li", { className: "muted", text: "nobody" })]);
    const undecided = ids.filter((p) => items[p].state !== "certified");
    $("close-campaign-id").textContent = id;
    clear($("close-suspend")).append(...list(undecided.filter((p) => items[p].state === "pending" && !official(p))));
    clear($("close-revoke")).append(...list(undecided.filter((p) => items[p].state === "revoked" && !official(p))));
    clear($("close-quorum")).append(...list(undecided.filter(official)));
    $("close-dialog").showModal();
  }

  async function confirmClose() {
    $("close-dialog").close();
    const id = state.campaign.campaign.id;
    const answer = await api("POST", `${campaignPath(id)}/close`);
    const result = answer.data || {};
    const names = (list) => (list && list.length ? list.join(", ") : "nobody");
    await loadCampaign(id);
    const quorum = result.left_to_quorum && result.left_to_quorum.length
      ? ` Left to the officials' quorum: ${names(result.left_to_quorum)}.` : "";
    showNotice(`Closed campaign ${id}. Suspended: ${names(result.suspended)}. Revoked: ${names(result.revoked)}.${quorum}`);
  }

  // --- audit log -----------------------------------------------------------------------------

  function auditQuery() {
    const limit = $("audit-limit").value.trim();
    return {
      principal: $("audit-principal").value.trim(),
      operation: $("audit-operation").value.trim(),
      decision: $("audit-decision").value,
      key: $("audit-key").value.trim(),
      since: utcSeconds($("audit-since")),
      until: utcSeconds($("audit-until")),
      limit,
    };
  }

  async function loadAudit() {
    const fresh = current();
    const query = { ...auditQuery(), before: state.audit.before ?? "" };
    const answer = await api("GET", "/v1/ekms/audit/records", { query });
    if (!fresh()) return;
    const data = answer.data || {};
    const records = data.records || [];
    state.audit.rows = new Map(records.map((r) => [r.index, r]));
    state.audit.next = data.next ?? null;
    $("audit-meta").textContent = `The log holds ${data.size} record(s); showing ${records.length}.`;
    clear($("audit-table")).append(table([
      ["#", (r) => el("button", { type: "button", className: "link", "data-testid": `audit-row-${r.index}`, text: r.index })],
      ["Time", (r) => fmtTime((r.record.time_us ?? 0) / 1e6)],
      ["Principal", (r) => r.record.principal ?? ""],
      ["Operation", (r) => r.record.operation ?? ""],
      ["Decision", (r) => badge(r.record.decision ?? "", r.record.decision)],
      ["Status", (r) => r.record.status ?? ""],
      ["Key", (r) => r.record.key ?? ""],
      ["Path", (r) => r.record.path ?? ""],
    ], records, "table-audit", (r) => `audit-record-${r.index}`));
    for (const button of $("audit-table").querySelectorAll("button[data-testid^='audit-row-']")) {
      button.addEventListener("click", () => showRecord(Number(button.textContent)).catch(showError));
    }
    $("audit-older").disabled = state.audit.next === null;
    $("audit-newer").disabled = state.audit.newer.length === 0;
  }

  /** Pages run newest first: "older" continues from the service's cursor, "newer" goes back. */
  function auditPage(direction) {
    if (direction === "older") {
      if (state.audit.next === null) return;
      state.audit.newer.push(state.audit.before);
      state.audit.before = state.audit.next;
    } else {
      if (!state.audit.newer.length) return;
      state.audit.before = state.audit.newer.pop();
    }
    loadAudit().catch(showError);
  }

  function proofStatus(result, text) {
    const status = $("audit-proof-status");
    status.textContent = text;
    status.dataset.result = result;
    status.className = `proof proof-${result}`;
  }

  async function showRecord(index) {
    const row = state.audit.rows.get(index);
    if (!row) return;
    $("audit-detail").hidden = false;
    $("audit-detail-index").textContent = String(index);
    $("audit-record-json").textContent = JSON.stringify(row.record, null, 2);
    $("audit-sign-head").hidden = true;
    $("audit-sign-head").dataset.index = String(index);
    proofStatus("pending", "Checking the inclusion proof…");
    try {
      await checkProof(row);
    } catch (error) {
      proofStatus("failed", `Proof check failed: ${error.message}`);
    }
  }

  async function checkProof(row) {
    const index = row.index;
    const heads = (await api("GET", "/v1/ekms/audit/heads")).data;
    const newest = (heads.heads || []).reduce((best, h) => (!best || h.size > best.size ? h : best), null);
    if (!newest || newest.size <= index) {
      proofStatus("uncovered", `Record ${index} is newer than the newest signed tree head${newest ? ` (size ${newest.size})` : ""}: sign a head to prove it.`);
      $("audit-sign-head").hidden = false;
      return;
    }
    const proof = (await api("GET", `/v1/ekms/audit/proof/${index}`, { query: { size: newest.size } })).data;
    const problem = await proofProblem(row, proof, newest, heads);
    if (problem) {
      proofStatus("failed", `NOT verified: ${problem}`);
    } else {
      proofStatus("verified", `Verified against signed tree head of size ${newest.size} (signed ${fmtTime(newest.timestamp_ms / 1000)}, key ${heads.kid}): the record's hash, its audit path to the root and the head's signature were checked in this browser.`);
    }
  }

  /** Why the record is not proven to be in the signed head, or null when it is. */
  async function proofProblem(row, proof, head, heads) {
    const leaf = await leafHash(encoder.encode(canonicalJson(row.record)));
    if (!equalBytes(leaf, hexToBytes(row.leaf_hash)) || proof.leaf_hash !== row.leaf_hash) {
      return "the record's hash differs from the leaf hash the log lists";
    }
    if (proof.index !== row.index || proof.tree_size !== head.size) {
      return "the proof is for another record or tree size";
    }
    if (!Array.isArray(proof.proof) || proof.proof.length > 64) return "the audit path is malformed";
    const root = await rootFromInclusion(leaf, row.index, head.size, proof.proof.map(hexToBytes));
    if (root === null) return "the audit path has the wrong length for this tree";
    if (!equalBytes(root, hexToBytes(head.root_hash))) {
      return `the audit path leads to ${bytesToHex(root).slice(0, 16)}…, not the signed root ${head.root_hash.slice(0, 16)}…`;
    }
    return headProblem(head, heads);
  }

  async function headProblem(head, heads) {
    if (!heads.public_key) return "the service names no key for its tree heads";
    const parts = String(head.jws).split(".");
    if (parts.length !== 3) return "the head's signature is not a compact JWS";
    let header;
    let claims;
    try {
      header = JSON.parse(new TextDecoder().decode(b64urlDecode(parts[0])));
      claims = JSON.parse(new TextDecoder().decode(b64urlDecode(parts[1])));
    } catch {
      return "the head's signature is malformed";
    }
    if (header.alg !== "ES256" || header.typ !== TREE_HEAD_TYPE) return "the head's signature has the wrong algorithm or type";
    if (header.kid !== undefined && header.kid !== heads.kid) return "the head is signed by another key";
    for (const name of ["root_hash", "size", "timestamp_ms"]) {
      if (claims[name] !== head[name]) return `the signed head's ${name} differs from the one listed`;
    }
    const jwk = heads.public_key;
    let key;
    try {
      key = await crypto.subtle.importKey("jwk", { kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y }, EC, false, ["verify"]);
    } catch {
      return "the head key is not an EC P-256 key";
    }
    const ok = await crypto.subtle.verify(ES256, key, b64urlDecode(parts[2]), encoder.encode(`${parts[0]}.${parts[1]}`));
    return ok ? null : "the head's signature does not verify";
  }

  async function signHead() {
    await api("POST", "/v1/ekms/audit/tree-head");
    const index = Number($("audit-sign-head").dataset.index);
    await showRecord(index);
  }

  // --- key use chart -------------------------------------------------------------------------

  async function loadUsage() {
    const fresh = current();
    const query = {
      bucket: $("usage-bucket").value,
      since: utcSeconds($("usage-since")),
      until: utcSeconds($("usage-until")),
      key: $("usage-key").value.trim(),
    };
    const answer = await api("GET", "/v1/ekms/audit/usage", { query });
    if (fresh()) renderUsage(answer.data);
  }

  function renderUsage(data) {
    const series = data.series || [];
    // The width in seconds; a name is read too, so the page does not depend on which one.
    const step = typeof data.bucket === "number" ? data.bucket : data.bucket === "day" ? 86400 : 3600;
    const unit = step === 86400 ? "day" : step === 3600 ? "hour" : `${step} s`;
    $("usage-meta").textContent = `Requests per ${unit}, ${fmtTime(data.since)} to ${fmtTime(data.until)} (UTC).`;
    const box = clear($("usage-charts"));
    if (!series.length) {
      box.append(el("p", { className: "muted empty", text: "No key use in this period." }));
      return;
    }
    for (const one of series) box.append(chart(one, step, data.since, data.until));
  }

  function niceMax(n) {
    if (n <= 5) return Math.max(1, n);
    const magnitude = 10 ** Math.floor(Math.log10(n));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * magnitude >= n) return m * magnitude;
    return n;
  }

  function chart(one, step, since, until) {
    const points = (one.points || []).filter((p) => Array.isArray(p) && p.length === 3 && p.every(Number.isFinite));
    if (!points.length) {
      return el("p", { className: "muted empty", "data-testid": `usage-${one.key}`, text: `${one.key}: no use in this period.` });
    }
    const starts = points.map((p) => p[0]);
    const first = Math.floor((Number.isFinite(since) ? since : Math.min(...starts)) / step) * step;
    const last = Math.max(Number.isFinite(until) ? until - 1 : 0, ...starts);
    const buckets = Math.max(1, Math.floor((last - first) / step) + 1);
    const width = 760;
    const height = 200;
    const left = 44;
    const right = 10;
    const top = 10;
    const bottom = 34;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const max = niceMax(Math.max(1, ...points.map((p) => p[1] + p[2])));
    const barW = plotW / buckets;
    const y = (v) => top + plotH - (v / max) * plotH;
    const totalAllowed = points.reduce((n, p) => n + p[1], 0);
    const totalDenied = points.reduce((n, p) => n + p[2], 0);

    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, width, height, role: "img", className: "chart",
      "data-testid": `usage-chart-${one.key}`, "aria-label": `Requests for key ${one.key}`,
    });
    for (const tick of [0, max / 2, max]) {
      root.append(
        svg("line", { x1: left, x2: width - right, y1: y(tick), y2: y(tick), className: "grid" }),
        svg("text", { x: left - 6, y: y(tick) + 4, className: "axis-label", "text-anchor": "end", text: Number.isInteger(tick) ? tick : tick.toFixed(1) }),
      );
    }
    for (const [start, allowed, denied] of points) {
      const i = Math.floor((start - first) / step);
      if (i < 0 || i >= buckets) continue;
      const x = left + i * barW + Math.min(1, barW * 0.1);
      const w = Math.max(1, barW - 2 * Math.min(1, barW * 0.1));
      const label = `${fmtTime(start)}: ${allowed} allowed, ${denied} denied`;
      root.append(svg("g", { className: "bar", "data-start": start },
        svg("title", { text: label }),
        svg("rect", { x, y: y(allowed), width: w, height: Math.max(0, y(0) - y(allowed)), className: "bar-allowed" }),
        svg("rect", { x, y: y(allowed + denied), width: w, height: Math.max(0, y(allowed) - y(allowed + denied)), className: "bar-denied" }),
      ));
    }
    root.append(
      svg("line", { x1: left, x2: width - right, y1: y(0), y2: y(0), className: "axis" }),
      svg("text", { x: left, y: height - 12, className: "axis-label", text: fmtTime(first) }),
      svg("text", { x: width - right, y: height - 12, className: "axis-label", "text-anchor": "end", text: fmtTime(first + buckets * step) }),
    );
    const legend = el("p", { className: "legend" },
      el("span", { className: "swatch swatch-allowed" }), ` allowed ${totalAllowed} `,
      el("span", { className: "swatch swatch-denied" }), ` denied ${totalDenied}`);
    return el("figure", { className: "usage", "data-testid": `usage-${one.key}` },
      el("figcaption", {}, el("strong", { text: one.key }), " ", legend), root);
  }

  // --- wiring --------------------------------------------------------------------------------

  function onSubmit(id, action) {
    $(id).addEventListener("submit", (event) => {
      event.preventDefault();
      clearMessages();
      Promise.resolve().then(action).catch(showError);
    });
  }

  function init() {
    const meta = document.querySelector('meta[name="ekms-audience"]');
    $("signin-audience").value = meta ? meta.content : "";
    onSubmit("signin-key-form", signInWithKey);
    onSubmit("signin-token-form", signInWithToken);
    onSubmit("report-filters", loadReport);
    onSubmit("campaign-open-form", openCampaign);
    onSubmit("audit-filters", () => {
      state.audit.before = null;
      state.audit.newer = [];
      return loadAudit();
    });
    onSubmit("usage-filters", loadUsage);
    onSubmit("revoke-form", confirmRevoke);
    onSubmit("close-form", confirmClose);
    $("revoke-cancel").addEventListener("click", () => $("revoke-dialog").close());
    $("close-cancel").addEventListener("click", () => $("close-dialog").close());
    $("campaign-close").addEventListener("click", () => askClose().catch(showError));
    $("sign-out").addEventListener("click", () => signOut().catch(showError));
    $("audit-older").addEventListener("click", () => auditPage("older"));
    $("audit-newer").addEventListener("click", () => auditPage("newer"));
    $("audit-sign-head").addEventListener("click", () => signHead().catch(showError));
    window.addEventListener("hashchange", route);

    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(TOKEN_KEY) || "null");
    } catch {
      sessionStorage.removeItem(TOKEN_KEY);
    }
    if (saved && typeof saved.token === "string") {
      startSession(saved.token, Boolean(saved.own)).catch((error) => {
        route();
        showError(error);
      });
    } else {
      route();
    }
    document.body.dataset.ready = "true";
  }

  init();
})();
