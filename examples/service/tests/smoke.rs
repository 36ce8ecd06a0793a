//! The service starts with a real pool of Python workers, answers both routes, refuses a bad
//! body, and stops cleanly on SIGTERM. Python: `PYPOOL_TEST_PYTHON` (set by `scripts/test.sh`),
//! else `python3`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

/// The service process; killed if a failed assertion leaves it running.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the service");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn answers_both_routes_and_stops_on_sigterm() {
    let python = std::env::var("PYPOOL_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let mut service = Service(
        Command::new(env!("CARGO_BIN_EXE_pypool-example-service"))
            .args([
                "--addr",
                "127.0.0.1:0",
                "--workers",
                "1",
                "--python",
                &python,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the service"),
    );
    // The service prints its address once the pool is ready and the port is open (or exits,
    // closing stdout, when the pool cannot start).
    let mut line = String::new();
    BufReader::new(service.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the service's first line");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("the service did not start: {line:?}"))
        .to_owned();

    assert_eq!(
        request(&addr, "GET", "/noop", ""),
        (200, r#"{"result":null}"#.to_owned())
    );

    let features = r#"{"features": [0.5, 1.5, 2.5, 3.5]}"#;
    let (status, body) = request(&addr, "POST", "/score", features);
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(reply["score"].is_f64(), "{body}");
    // The work is deterministic: the same features, the same score.
    assert_eq!(request(&addr, "POST", "/score", features), (200, body));

    // A body that is not a list of numbers is refused before any Python runs.
    let (status, _) = request(&addr, "POST", "/score", r#"{"features": "many"}"#);
    assert_eq!(status, 422);

    // SIGTERM: in-flight requests finish, the pool shuts its workers down, the service exits 0.
    let pid = i32::try_from(service.0.id()).expect("pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = service.0.wait().expect("wait for the service");
    assert!(status.success(), "{status}");
}
