//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `scripts/install-tools.sh`) opens the page of `stockflow run`; the stock table fills, and an
//! oversell caused after the page loaded appears in the alert feed without a reload (the page's
//! own state survives) while its SKU rises to the top, highlighted. A screenshot is saved.
//!
//! Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: requests
//! on fd 3, answers on fd 4, NUL-terminated JSON), so no WebDriver or WebSocket client is needed.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use support::{Run, placed, post_events, received, wait_for};

struct Chromium {
    child: Child,
    to: ChildStdin,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn launch() -> Chromium {
        let exe = std::env::var("STOCKFLOW_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        // The shell maps our pipes onto the fds Chromium reads (3) and writes (4).
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 1>&2"#)
            .arg(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-quic",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1400,1000",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = child.unwrap_or_else(|e| panic!("cannot start {exe} ({e}): run scripts/install-tools.sh"));
        let to = child.stdin.take().unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut msg = Vec::new();
                match reader.read_until(0, &mut msg) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        msg.pop();
                        if let Ok(v) = serde_json::from_slice::<Value>(&msg)
                            && tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Chromium { child, to, from, next: 0, session: None, _profile: profile }
    }

    /// One DevTools command (on the attached page once there is one); its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        self.to.flush().unwrap();
        loop {
            let v = self
                .from
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("Chromium did not answer {method} (is /usr/bin/chromium installed?)"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({ "url": url }))["targetId"].clone();
        let session = self.call("Target.attachToTarget", json!({ "targetId": target, "flatten": true }))["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        self.session = Some(session);
    }

    /// Evaluates `expr` in the page while it may still be loading: `None` when the page has no
    /// context yet or the expression threw.
    fn try_eval(&mut self, expr: &str) -> Option<Value> {
        self.next += 1;
        let id = self.next;
        let params = json!({ "expression": expr, "returnByValue": true });
        let mut msg = json!({ "id": id, "method": "Runtime.evaluate", "params": params, "sessionId": self.session });
        if self.session.is_none() {
            msg.as_object_mut().unwrap().remove("sessionId");
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        loop {
            let v = self.from.recv_timeout(Duration::from_secs(60)).expect("Chromium stopped answering");
            if v["id"] == id {
                let r = &v["result"];
                return (v.get("error").is_none() && r.get("exceptionDetails").is_none())
                    .then(|| r["result"]["value"].clone());
            }
        }
    }

    /// Evaluates `expr` in the page; its JSON value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true }));
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn headless_chromium_sees_the_table_fill_and_an_oversell_arrive_live() {
    let dir = tempfile::tempdir().unwrap();
    let mut run =
        Run::start(dir.path(), "shards = 3\n[worker]\ncommit_interval_ms = 50\n[dashboard]\nrefresh_ms = 200\n");
    let events: Vec<String> = (0..200).map(|i| received(&format!("r{i}"), &format!("SKU-{i:03}"), 5)).collect();
    post_events(&run.ingest, &events);

    let mut browser = Chromium::launch();
    browser.open(&format!("http://{}/", run.dashboard));
    let rows = wait_for("the stock table to fill", Duration::from_secs(60), || {
        let v = browser.try_eval(
            "({rows: document.querySelectorAll('#stock-body tr').length, \
               skus: document.getElementById('k-skus')?.textContent, \
               live: document.getElementById('status')?.dataset.state})",
        )?;
        (v["rows"].as_u64() == Some(50) && v["skus"] == "200" && v["live"] == "live").then_some(v)
    });
    assert_eq!(rows["rows"], 50, "one page of 50 of the 200 SKUs");
    let negative = browser.eval("document.querySelectorAll('#stock-body tr.negative').length");
    assert_eq!(negative, 0, "nothing oversold yet");

    // Mark this page: a reload would lose the mark.
    browser.eval("window.__probe = 'same page'; document.querySelectorAll('#alerts-list li').length");
    post_events(&run.ingest, &[placed("late-order", "SKU-042", 8, "114-LIVE-1")]);
    let alert = wait_for("the oversell in the live feed", Duration::from_secs(60), || {
        let v = browser.eval(
            "(() => { const li = document.querySelector('#alerts-list li[data-id=\"oversell:late-order\"]'); \
              const top = document.querySelector('#stock-body tr'); \
              return li && top && top.dataset.sku === 'SKU-042' ? {text: li.textContent, probe: window.__probe, \
                live: document.getElementById('alerts-list').dataset.live, fresh: li.classList.contains('fresh'), \
                negative: top.classList.contains('negative'), available: top.children[1].textContent} : null; })()",
        );
        (!v.is_null()).then_some(v)
    });
    assert_eq!(alert["probe"], "same page", "the alert arrived without a reload");
    assert_eq!(alert["live"], "1", "pushed over the stream, not read by a reload");
    assert_eq!(alert["fresh"], true);
    let text = alert["text"].as_str().unwrap();
    assert!(text.contains("SKU-042") && text.contains("oversold by 3") && text.contains("114-LIVE-1"), "{text}");
    assert_eq!((alert["negative"].as_bool(), alert["available"].as_str()), (Some(true), Some("-3")));
    // At a common laptop width (the window is 1400 px) the alert feed is inside the page, not
    // pushed off its right edge by the stock table, and the page does not scroll sideways.
    let layout = browser.eval(
        "(() => { const r = document.getElementById('alerts-list').getBoundingClientRect(); \
          const li = document.querySelector('#alerts-list li').getBoundingClientRect(); \
          return {right: r.right, width: r.width, li_right: li.right, view: document.documentElement.clientWidth, \
                  page: document.documentElement.scrollWidth}; })()",
    );
    let num = |k: &str| layout[k].as_f64().unwrap_or(f64::NAN);
    assert!(num("right") <= num("view") && num("li_right") <= num("view"), "alert feed clipped: {layout}");
    assert!(num("width") >= 250.0, "alert feed squeezed: {layout}");
    assert!(num("page") <= num("view"), "the page scrolls sideways: {layout}");

    // The detail of a SKU opens from its row.
    browser.eval("document.querySelector('#stock-body tr').click()");
    let detail = wait_for("the SKU detail", Duration::from_secs(30), || {
        let v = browser
            .eval("document.getElementById('detail').open ? document.getElementById('detail-body').textContent : null");
        v.as_str().map(str::to_string)
    });
    assert!(
        detail.contains("SKU-042") && detail.contains("Open windows") && detail.contains("oversold by 3"),
        "{detail}"
    );
    browser.eval("document.getElementById('detail').close()");

    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    println!("screenshot: {}", path.display());
    drop(browser);
    assert!(run.stop());
}
