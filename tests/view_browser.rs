//! The lens page in a real browser: headless Chromium driven over WebDriver
//! (`chromedriver`, plain HTTP through `ureq`). Debian's `chromium` and
//! `chromium-driver` (installed by `scripts/setup-deps`); without them the tests
//! skip, except in CI (`CI` set), where they fail.
//!
//! Screenshots go to `target/view-artifacts/`.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn artifacts() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/view-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lens-small.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// Chromium and chromedriver, or `None` (skip) outside CI.
fn tools() -> Option<(PathBuf, PathBuf)> {
    let chromium = on_path("chromium").or_else(|| on_path("chromium-browser"));
    let driver = on_path("chromedriver");
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        (c, d) => {
            let missing = format!(
                "{}{}",
                if c.is_none() { "chromium " } else { "" },
                if d.is_none() { "chromedriver" } else { "" }
            );
            assert!(
                std::env::var_os("CI").is_none(),
                "{missing} missing in CI (scripts/setup-deps installs chromium and chromium-driver)"
            );
            eprintln!("SKIPPED: {missing} missing; run scripts/setup-deps");
            None
        }
    }
}

/// A chromedriver process and one headless Chromium session (both ended on drop).
struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `value` of a WebDriver answer; a WebDriver error is a panic with its message.
fn wd(r: Result<ureq::Response, ureq::Error>, what: &str) -> Value {
    let (code, resp) = match r {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("{what}: {e}"),
    };
    let v: Value = resp.into_json().unwrap_or(Value::Null);
    assert!(code == 200, "{what}: HTTP {code}: {v}");
    v["value"].clone()
}

impl Browser {
    fn start() -> Option<Self> {
        let (chromium, driver) = tools()?;
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1360,900",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let v = wd(
            ureq::post(&format!("{base}/session")).send_json(caps),
            "new session",
        );
        let session = v["sessionId"].as_str().unwrap().to_string();
        Some(Self {
            driver: child,
            base,
            session,
            _profile: profile,
        })
    }

    fn url(&self, p: &str) -> String {
        format!("{}/session/{}{p}", self.base, self.session)
    }

    fn post(&self, p: &str, body: Value) -> Value {
        wd(ureq::post(&self.url(p)).send_json(body), p)
    }

    fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url }));
    }

    fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
    }

    fn find(&self, css: &str) -> String {
        let v = self.post("/element", json!({"using": "css selector", "value": css}));
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.post(&format!("/element/{e}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.post(&format!("/element/{e}/clear"), json!({}));
        self.post(&format!("/element/{e}/value"), json!({ "text": text }));
    }

    fn hover(&self, css: &str) {
        let e = self.find(css);
        self.post(
            "/actions",
            json!({"actions": [{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                "actions": [{"type": "pointerMove", "duration": 0, "origin": {ELEMENT: e}, "x": 0, "y": 0}]}]}),
        );
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let v = wd(ureq::get(&self.url("/screenshot")).call(), "screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        let p = artifacts().join(name);
        std::fs::write(&p, png).unwrap();
        p
    }

    /// Console messages at level SEVERE (errors, uncaught exceptions, failed loads).
    fn console_errors(&self) -> Vec<Value> {
        let v = self.post("/se/log", json!({"type": "browser"}));
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .cloned()
            .collect()
    }

    fn wait_for(&self, what: &str, secs: u64, script: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.js(script);
            if v.as_bool() != Some(false) && !v.is_null() {
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}; status: {}",
                self.js("return document.getElementById('status').textContent")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&self.url("")).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

const FILLED: &str = "return document.querySelectorAll('#grid-body td.cell.filled').length";

#[test]
fn static_lens_html_renders_offline_and_escapes_pieces() {
    let Some(b) = Browser::start() else { return };
    let data = fixture();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lens.html");
    std::fs::write(&file, latent_tap::view::static_html(&data)).unwrap();
    b.goto(&format!("file://{}", file.display()));
    b.wait_for(
        "the static grid",
        10,
        "return document.getElementById('status').dataset.state === 'done'",
    );
    let rows = data["lens"]["rows"].as_array().unwrap();
    let n_layers = data["lens"]["layers"].as_array().unwrap().len();
    let non_null = rows
        .iter()
        .flat_map(|r| r["cells"].as_array().unwrap())
        .filter(|c| !c.is_null())
        .count();
    assert_eq!(b.js(FILLED), json!(non_null));
    assert_eq!(
        b.js("return document.querySelectorAll('#grid-body td.cell').length"),
        json!(rows.len() * n_layers)
    );
    // The hostile piece is text, not markup.
    assert_eq!(
        b.js("return document.querySelectorAll('img').length"),
        json!(0)
    );
    assert_eq!(b.js("return window.__pwned === undefined"), json!(true));
    let text = b.js("return document.getElementById('grid').textContent");
    assert!(text.as_str().unwrap().contains("</script><img"), "{text}");
    // The form is hidden: a static file never calls a server.
    assert_eq!(
        b.js("return getComputedStyle(document.getElementById('gen-form')).display"),
        json!("none")
    );
    // Click the column of " France" (pos 4, target " is"): its curve.
    b.click("#head-row th:nth-child(6) button");
    let curve = b.wait_for(
        "the curve",
        5,
        "const c = document.getElementById('curve'); return c.querySelector('polyline') ? c.textContent : null",
    );
    assert!(curve.as_str().unwrap().contains("position 4"), "{curve}");
    b.screenshot("static-lens.png");
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

/// A stand-in for `serve` speaking the lens contract (docs/PROTOCOL.md) with
/// the fixture's rows, one step per SSE chunk, `delay` apart: it makes "the grid
/// grows while tokens stream" observable whatever the machine's speed.
struct FakeServe {
    url: String,
}

fn fake_serve(data: Value, delay: Duration) -> FakeServe {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let data = data.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let send = |s: &mut std::net::TcpStream, ct: &str, b: &str| {
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                        b.len()
                    );
                };
                let lens = &data["lens"];
                match path.as_str() {
                    "/" => send(&mut s, "text/html; charset=utf-8", &latent_tap::view::page()),
                    "/props" => send(
                        &mut s,
                        "application/json",
                        &json!({"model_alias": "fake", "lens": {"available": true, "n_layer": 3, "layers": lens["layers"]}}).to_string(),
                    ),
                    "/tokenize" => {
                        let toks: Vec<Value> = data["tokens"].as_array().unwrap()[..6]
                            .iter()
                            .map(|t| json!({"id": t["id"], "piece": t["piece"]}))
                            .collect();
                        send(&mut s, "application/json", &json!({ "tokens": toks }).to_string())
                    }
                    "/completion" => {
                        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                        );
                        let rows = lens["rows"].as_array().unwrap();
                        let steps: std::collections::BTreeSet<u64> =
                            rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
                        for step in steps {
                            std::thread::sleep(delay);
                            let rs: Vec<&Value> =
                                rows.iter().filter(|r| r["step"] == step).collect();
                            let last = rs.iter().all(|r| r["target"].is_null());
                            let mut chunk = json!({
                                "content": if last { "".into() } else { rs.last().unwrap()["target_piece"].clone() },
                                "tokens": if last { json!([]) } else { json!([rs.last().unwrap()["target"]]) },
                                "stop": last,
                                "lens": {"layers": lens["layers"], "n_vocab": lens["n_vocab"], "rows": rs},
                            });
                            if req["latents"].is_object() {
                                // Two f32 values per row: pos and step.
                                let vals: Vec<u8> = rs
                                    .iter()
                                    .flat_map(|r| [r["pos"].as_f64().unwrap() as f32, step as f32])
                                    .flat_map(f32::to_le_bytes)
                                    .collect();
                                use base64::Engine as _;
                                chunk["latents"] = json!({"l_out-1": {
                                    "shape": [rs.len(), 2], "dtype": "f32",
                                    "pos": rs.iter().map(|r| r["pos"].clone()).collect::<Vec<_>>(),
                                    "step": vec![step; rs.len()],
                                    "data": base64::engine::general_purpose::STANDARD.encode(vals)}});
                            }
                            if write!(s, "data: {chunk}\n\n").is_err() {
                                return;
                            }
                            let _ = s.flush();
                        }
                    }
                    _ => {
                        let _ = write!(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    }
                }
            });
        }
    });
    FakeServe { url }
}

/// Press Generate and watch the grid: returns the filled-cell counts seen while
/// the tokens streamed (ending at the final count) and the number of columns.
fn generate_and_watch(b: &Browser) -> (Vec<u64>, usize) {
    // Record the filled-cell count at every change of the grid (the page is not
    // instrumented: a MutationObserver the test installs).
    b.js("window.__seen = []; if (window.__obs) window.__obs.disconnect(); window.__obs = new MutationObserver(() => { const n = document.querySelectorAll('#grid-body td.cell.filled').length; if (window.__seen[window.__seen.length - 1] !== n) window.__seen.push(n); }); window.__obs.observe(document.getElementById('grid-body'), {childList: true, subtree: true}); return true");
    b.click("#generate");
    // Sample it from here too while the tokens stream.
    let mut polled = Vec::new();
    let t0 = Instant::now();
    loop {
        let state = b.js("return document.getElementById('status').dataset.state");
        let n = b.js(FILLED).as_u64().unwrap();
        if polled.last() != Some(&n) {
            polled.push(n);
        }
        if state == "done" || state == "error" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "generation did not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = b.js("return document.getElementById('status').textContent");
    assert_eq!(
        b.js("return document.getElementById('status').dataset.state"),
        "done",
        "{status}"
    );
    let seen: Vec<u64> = serde_json::from_value(b.js("return window.__seen")).unwrap();
    let filled = b.js(FILLED).as_u64().unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "the grid only grows: {seen:?}"
    );
    assert_eq!(seen.last().copied(), Some(filled), "{seen:?}");
    let columns = b
        .js("return document.querySelectorAll('#head-row th').length - 1")
        .as_u64()
        .unwrap() as usize;
    let layers = b
        .js("return document.querySelectorAll('#grid-body tr').length - 1")
        .as_u64()
        .unwrap() as usize;
    assert_eq!(
        b.js("return document.querySelectorAll('#grid-body td.cell').length"),
        json!(layers * columns)
    );
    eprintln!("{status}: filled cells seen by the observer: {seen:?}; polled: {polled:?}");
    (seen, columns)
}

/// The number of tokens the page says it generated.
fn tokens_done(b: &Browser) -> usize {
    let s = b.js("return document.getElementById('status').textContent");
    let s = s.as_str().unwrap();
    s.strip_prefix("Done: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {s:?}"))
}

/// Hover and keyboard focus show a cell's top-k; a token's column shows its curve.
fn check_interaction(b: &Browser, k: usize) {
    b.hover("#grid-body td.cell.filled");
    let n = b.wait_for(
        "the top-k on hover",
        5,
        "const t = document.querySelector('#details table.topk'); return t ? t.tBodies[0].rows.length : null",
    );
    assert!(
        n.as_u64().unwrap() as usize >= 1 && n.as_u64().unwrap() as usize <= k,
        "{n}"
    );
    // Keyboard: the grid has one tab stop; arrows move it and focus shows the top-k.
    b.js("document.getElementById('details').textContent = ''; return true");
    let stop = b.find("#grid-body td.cell[tabindex='0']");
    b.post(
        &format!("/element/{stop}/value"),
        json!({"text": "\u{E014}"}),
    ); // ArrowRight
    let focused = b.js(
        "const a = document.activeElement; return a && a.matches('td.cell') ? a.dataset.col : null",
    );
    assert_eq!(focused, json!("1"), "ArrowRight moves the focus");
    b.wait_for(
        "the top-k on focus",
        5,
        "return !!document.querySelector('#details table.topk')",
    );
    // Enter on the focused cell selects its column: the curve and its values.
    let now = b.find("#grid-body td.cell[tabindex='0']");
    b.post(
        &format!("/element/{now}/value"),
        json!({"text": "\u{E007}"}),
    ); // Enter
    b.wait_for(
        "the curve",
        5,
        "return !!document.querySelector('#curve polyline, #curve p')",
    );
    b.click("#head-row th:last-child button");
    b.wait_for(
        "the curve of the last column",
        5,
        "return document.querySelector('#head-row th:last-child').classList.contains('selected')",
    );
}

#[test]
fn live_page_fills_the_grid_as_chunks_stream() {
    let Some(b) = Browser::start() else { return };
    let data = fixture();
    let rows = data["lens"]["rows"].as_array().unwrap().len();
    let non_null = data["lens"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["cells"].as_array().unwrap())
        .filter(|c| !c.is_null())
        .count();
    let fake = fake_serve(data, Duration::from_millis(250));
    b.goto(&format!("{}/", fake.url));
    b.wait_for(
        "the props",
        10,
        "return document.getElementById('model-line').textContent.includes('fake')",
    );
    b.type_into("#prompt", "The capital of France is");
    b.click("#want_latents");
    let (seen, columns) = generate_and_watch(&b);
    assert_eq!(columns, rows);
    assert_eq!(b.js(FILLED), json!(non_null));
    assert_eq!(tokens_done(&b), 2);
    // Three steps, each its own chunk: the grid grew in (at least) three stages.
    assert!(seen.len() >= 3, "{seen:?}");
    check_interaction(&b, 5);
    b.screenshot("live-fake.png");
    // The latents download: a safetensors file of the streamed rows.
    let bytes = download_latents(&b);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("l_out-1").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    assert_eq!(t.shape(), &[rows, 2]);
    let v: Vec<f32> = t
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(&v[..4], &[0.0, 0.0, 1.0, 0.0]);
    assert_eq!(&v[v.len() - 2..], &[7.0, 2.0]);
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

/// `lens.html` and `lens.png` of the fixture, kept as artifacts (no browser needed).
#[test]
fn static_files_of_the_fixture() {
    let data = fixture();
    let dir = artifacts();
    latent_tap::view::heatmap_png(&data, &dir.join("fixture-lens.png")).unwrap();
    let html = latent_tap::view::static_html(&data);
    std::fs::write(dir.join("fixture-lens.html"), &html).unwrap();
    let png = std::fs::read(dir.join("fixture-lens.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(html.contains("id=\"lens-data\"") && !html.contains("<img"));
}

/// `GET /` on `serve`: the page, with its content type and cache headers, and
/// without the API key (the page holds no data; what it asks for needs the key).
#[test]
fn serve_answers_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_model(dir.path());
    let s = common::http::Server::start(&m, &["--api-key", "k3y"]);
    let r = ureq::get(&s.url("/")).call().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r
        .header("content-security-policy")
        .unwrap()
        .contains("connect-src 'self'"));
    let body = r.into_string().unwrap();
    assert_eq!(body, latent_tap::view::page());
    assert!(body.contains("<table id=\"grid\">"));
    match ureq::get(&s.url("/props")).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("/props without the key: {other:?}"),
    }
    // Another method on the page's path: the server's usual 404.
    match ureq::post(&s.url("/")).send_string("") {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("POST /: {other:?}"),
    }
}

/// The page on `serve` with the synthetic model: the real `lens` field, streamed.
#[test]
fn live_page_on_serve_fills_layers_by_tokens() {
    let Some(b) = Browser::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_model(dir.path());
    let s = common::http::Server::start(&m, &[]);
    let n_layer = latent_tap::synth::SynthConfig::default().n_layer;
    b.goto(&s.url("/"));
    b.wait_for(
        "the props",
        10,
        &format!(
            "return document.getElementById('model-line').textContent.includes('{n_layer} layers')"
        ),
    );
    b.type_into("#prompt", "hello world");
    b.type_into("#n_predict", "48");
    // Generated rows only: every column has every layer.
    b.js("document.getElementById('rows').value = 'last'; return true");
    let (seen, columns) = generate_and_watch(&b);
    let n = tokens_done(&b);
    assert!(n >= 1);
    assert_eq!(columns, n, "one column per generated token");
    assert_eq!(b.js(FILLED), json!(n_layer * n), "layers × tokens");
    if n >= 8 {
        assert!(
            seen.len() >= 3,
            "the grid grew while tokens streamed: {seen:?}"
        );
    }
    check_interaction(&b, 5);
    b.screenshot("live-synth.png");
    // Prompt and generated rows: the last layer has only the output rows.
    b.js("document.getElementById('rows').value = 'all'; return true");
    let (_, columns) = generate_and_watch(&b);
    let n = tokens_done(&b);
    let n_prompt = 1 + "hello world".len(); // BOS + one token per byte
    assert_eq!(columns, n_prompt + n - 1);
    let none = b.js("return document.querySelectorAll('#grid-body td.cell.none').length");
    assert_eq!(
        none,
        json!(n_prompt - 1),
        "the last layer's prompt rows (but the last) do not exist"
    );
    // A layer range: only those rows; with the latents of those layers, for download.
    b.type_into("#layers", "1..=2");
    b.js("document.getElementById('rows').value = 'last'; return true");
    b.click("#want_latents");
    let (_, columns) = generate_and_watch(&b);
    let heads =
        b.js("return [...document.querySelectorAll('#grid-body th')].map((t) => t.textContent)");
    assert_eq!(heads, json!(["next", "L2", "L1"]));
    assert_eq!(b.js(FILLED), json!(2 * columns));
    let file = download_latents(&b);
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["l_out-1", "l_out-2"]);
    let n_embd = latent_tap::synth::SynthConfig::default().n_embd;
    for n in names {
        let t = st.tensor(n).unwrap();
        assert_eq!(
            (t.dtype(), t.shape()),
            (safetensors::Dtype::F32, &[columns, n_embd][..])
        );
    }
    // Chat: the prompt through the server's template (/apply-template).
    b.click("input[name=mode][value=chat]");
    generate_and_watch(&b);
    assert!(tokens_done(&b) >= 1);
    assert!(b
        .js("return document.getElementById('output').textContent")
        .as_str()
        .unwrap()
        .contains("<|im_start|>user"));
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    // A layer the model lacks: the server's message on the page, in its alert.
    b.type_into("#layers", "7");
    b.click("#want_latents"); // off: the lens's own message
    b.click("#generate");
    let msg = b.wait_for(
        "the error",
        30,
        "const s = document.getElementById('status'); return s.dataset.state === 'error' ? document.getElementById('error').textContent : null",
    );
    assert!(msg.as_str().unwrap().contains('7'), "{msg}");
    assert_eq!(
        b.js("return document.getElementById('error').getAttribute('role')"),
        "alert"
    );
}

/// The README's screenshot: the real model on "The capital of France is"
/// (`target/view-artifacts/real-model.png`; `docs/img/lens-view.png` is a copy).
#[test]
fn live_page_on_the_real_model() {
    let Some(model) = common::real_model() else {
        return;
    };
    let Some(b) = Browser::start() else { return };
    let s = common::http::Server::start(
        &model,
        &["--chat-template", "gemma", "--alias", "gemma-3-270m-q4_k_m"],
    );
    b.post("/window/rect", json!({"width": 1440, "height": 1120}));
    b.goto(&s.url("/"));
    b.wait_for(
        "the props",
        30,
        "return document.getElementById('model-line').textContent.includes('18 layers')",
    );
    b.type_into("#prompt", "The capital of France is");
    b.type_into("#n_predict", "6");
    let (_, columns) = generate_and_watch(&b);
    let n = tokens_done(&b);
    assert_eq!(
        columns,
        6 + n - 1,
        "BOS + 5 prompt tokens, then the generated ones"
    );
    // The last prompt position: the model's answer and where it forms.
    let last_prompt = b.find("#head-row th:nth-child(7) button");
    b.post(&format!("/element/{last_prompt}/click"), json!({}));
    let curve = b.wait_for("the curve", 5, "const c = document.getElementById('curve'); return c.querySelector('polyline') ? c.textContent : null");
    eprintln!("{curve}");
    b.hover("#grid-body tr:nth-child(2) td:nth-child(7)");
    b.wait_for(
        "the top-k",
        5,
        "return !!document.querySelector('#details table.topk')",
    );
    b.screenshot("real-model.png");
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

/// `latent-tap lens --out DIR` on the synthetic model: its `lens.html` renders
/// in the browser without a server (every cell of its data filled) and its
/// `lens.png` decodes at the heatmap's size.
#[test]
fn cli_lens_html_renders() {
    let Some(b) = Browser::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_model(dir.path());
    let out = dir.path().join("out");
    let st = common::bin()
        .args(["lens", "-t", "2", "-n", "4", "-p", "hello", "--out"])
        .arg(&out)
        .arg("-m")
        .arg(&m)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let html = std::fs::read_to_string(out.join("lens.html")).unwrap();
    let start = html.find("id=\"lens-data\">").unwrap() + "id=\"lens-data\">".len();
    let end = start + html[start..].find("</script>").unwrap();
    let data: Value = serde_json::from_str(&html[start..end]).unwrap();
    let rows = data["lens"]["rows"].as_array().unwrap();
    let layers = data["lens"]["layers"].as_array().unwrap().len();
    let non_null = rows
        .iter()
        .flat_map(|r| r["cells"].as_array().unwrap())
        .filter(|c| !c.is_null())
        .count();
    assert!(non_null > 0);
    b.goto(&format!("file://{}", out.join("lens.html").display()));
    b.wait_for(
        "the static grid",
        10,
        "return document.getElementById('status').dataset.state === 'done'",
    );
    assert_eq!(b.js(FILLED), json!(non_null));
    assert_eq!(
        b.js("return document.querySelectorAll('#grid-body td.cell').length"),
        json!(rows.len() * layers)
    );
    b.screenshot("cli-lens-html.png");
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let dec = png::Decoder::new(std::fs::File::open(out.join("lens.png")).unwrap());
    let info = dec.read_info().unwrap().info().clone();
    assert!(info.width >= 420 && info.height as usize > layers * 18);
}

/// Press "Download latents" and return the file's bytes (the blob the page
/// hands to the download link, read back in the page).
fn download_latents(b: &Browser) -> Vec<u8> {
    b.js("window.__blobs = []; if (!window.__origURL) window.__origURL = URL.createObjectURL; URL.createObjectURL = (x) => { window.__blobs.push(x); return window.__origURL(x); }; return true");
    b.click("#download");
    let b64 = b.post(
        "/execute/async",
        json!({"script": "const done = arguments[arguments.length - 1]; window.__blobs[0].arrayBuffer().then((a) => { let s = ''; for (const x of new Uint8Array(a)) s += String.fromCharCode(x); done(btoa(s)); });", "args": []}),
    );
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().unwrap())
        .unwrap()
}

/// With `--api-key`: the page loads without the key, says where to enter it,
/// and works once it is entered.
#[test]
fn live_page_with_an_api_key() {
    let Some(b) = Browser::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_model(dir.path());
    let s = common::http::Server::start(&m, &["--api-key", "k3y"]);
    b.goto(&s.url("/"));
    let line = b.wait_for(
        "the key hint",
        10,
        "const t = document.getElementById('model-line').textContent; return t.includes('Server key') ? t : null",
    );
    assert!(line.as_str().unwrap().contains("unavailable"), "{line}");
    b.click("#api_key_box summary");
    b.type_into("#api_key", "k3y");
    b.click("#prompt"); // leaving the field commits it (change event)
    b.wait_for(
        "the props",
        10,
        "return document.getElementById('model-line').textContent.includes('3 layers')",
    );
    b.type_into("#n_predict", "4");
    let (_, columns) = generate_and_watch(&b);
    assert!(columns > 1);
}
