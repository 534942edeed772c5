//! TEMPORARY stand-ins for `crate::rules`, `crate::targets`, `crate::headers` and
//! `crate::proxy::client` with the signatures those modules promise, so the server pipeline
//! builds and is tested before they land. Deleted when they land (the pipeline only changes its
//! `use` lines).
#![allow(
    missing_docs,
    reason = "temporary stand-ins, deleted when the real modules land"
)]

pub mod rules {
    use std::net::IpAddr;
    use std::time::Duration;

    use http::{HeaderMap, StatusCode};

    pub struct RequestView<'a> {
        pub method: &'a str,
        pub host: Option<&'a str>,
        pub path: &'a str,
        pub query: Option<&'a str>,
        pub headers: &'a HeaderMap,
        pub source_ip: IpAddr,
    }

    pub struct Matched<'a> {
        pub priority: u32,
        pub action: &'a Action,
        pub rules_evaluated: u32,
    }

    pub enum Action {
        Forward(ForwardAction),
        Redirect(RedirectAction),
        FixedResponse(FixedResponseAction),
    }

    pub struct WeightedGroup {
        pub name: String,
        pub weight: u32,
    }

    pub struct ForwardAction {
        pub groups: Vec<WeightedGroup>,
        pub group_stickiness: Option<Duration>,
    }

    impl ForwardAction {
        pub fn choose(&self, random: u32) -> &str {
            let total: u32 = self.groups.iter().map(|g| g.weight).sum();
            let mut r = if total == 0 { 0 } else { random % total };
            for g in &self.groups {
                if r < g.weight {
                    return &g.name;
                }
                r -= g.weight;
            }
            self.groups.first().map(|g| g.name.as_str()).unwrap_or("")
        }
    }

    pub struct RedirectAction {
        pub location: String,
        pub status: StatusCode,
    }

    impl RedirectAction {
        pub fn location(&self, _req: &RequestView<'_>, _proto: &str, _port: u16) -> String {
            self.location.clone()
        }
        pub fn status(&self) -> StatusCode {
            self.status
        }
    }

    pub struct FixedResponseAction {
        pub status: StatusCode,
        pub content_type: Option<String>,
        pub body: String,
    }

    pub struct RuleSet {
        pub default: Action,
    }

    impl RuleSet {
        pub fn evaluate(&self, _req: &RequestView<'_>) -> Matched<'_> {
            Matched {
                priority: 0,
                action: &self.default,
                rules_evaluated: 1,
            }
        }
    }
}

pub mod targets {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::HeaderValue;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum TargetProtocol {
        Http,
        Https,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ProtocolVersion {
        Http1,
        Http2,
    }

    pub struct TargetGroupConfig {
        pub name: String,
        pub protocol: TargetProtocol,
        pub protocol_version: ProtocolVersion,
        pub verify_tls: bool,
    }

    pub struct TargetGroup {
        pub config: TargetGroupConfig,
        pub targets: Vec<SocketAddr>,
        next: AtomicUsize,
        outstanding: Arc<AtomicUsize>,
    }

    impl TargetGroup {
        pub fn new(config: TargetGroupConfig, targets: Vec<SocketAddr>) -> Self {
            Self {
                config,
                targets,
                next: AtomicUsize::new(0),
                outstanding: Arc::default(),
            }
        }
        pub fn config(&self) -> &TargetGroupConfig {
            &self.config
        }
        pub fn outstanding(&self) -> usize {
            self.outstanding.load(Ordering::SeqCst)
        }
        pub fn pick(&self, _cookies: Option<&str>) -> Option<Picked> {
            if self.targets.is_empty() {
                return None;
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
            self.outstanding.fetch_add(1, Ordering::SeqCst);
            Some(Picked {
                addr: self.targets[i],
                outstanding: self.outstanding.clone(),
            })
        }
    }

    pub struct Picked {
        pub addr: SocketAddr,
        outstanding: Arc<AtomicUsize>,
    }

    impl Picked {
        pub fn set_cookies(&self, _response_headers: &http::HeaderMap) -> Vec<HeaderValue> {
            Vec::new()
        }
    }

    impl Drop for Picked {
        fn drop(&mut self) {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

pub mod headers {
    use std::net::IpAddr;
    use std::time::SystemTime;

    use http::{HeaderMap, HeaderValue};

    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum XffMode {
        #[default]
        Append,
        Preserve,
        Remove,
    }

    impl std::str::FromStr for XffMode {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            match s {
                "append" => Ok(Self::Append),
                "preserve" => Ok(Self::Preserve),
                "remove" => Ok(Self::Remove),
                o => Err(format!("unknown xff mode {o:?}")),
            }
        }
    }

    #[derive(Debug)]
    pub struct TooManyForwardedFor {
        pub count: usize,
    }

    pub fn request_cookies(headers: &HeaderMap) -> Option<String> {
        let lines: Vec<&str> = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!lines.is_empty()).then(|| lines.join("; "))
    }

    pub fn apply_forwarded(
        headers: &mut HeaderMap,
        peer: IpAddr,
        proto: &str,
        port: u16,
        mode: XffMode,
    ) -> Result<(), TooManyForwardedFor> {
        let existing: Vec<String> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|s| s.trim().to_owned()))
            .collect();
        if existing.len() > 30 {
            return Err(TooManyForwardedFor {
                count: existing.len(),
            });
        }
        match mode {
            XffMode::Append => {
                let mut v = existing;
                v.push(peer.to_string());
                if let Ok(h) = HeaderValue::from_str(&v.join(", ")) {
                    headers.insert("x-forwarded-for", h);
                }
            }
            XffMode::Preserve => {}
            XffMode::Remove => {
                headers.remove("x-forwarded-for");
            }
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
        );
        headers.insert("x-forwarded-port", HeaderValue::from(port));
        Ok(())
    }

    pub fn trace_id(
        headers: &mut HeaderMap,
        now: SystemTime,
        rng: &mut impl rand::RngCore,
    ) -> HeaderValue {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = format!(
            "1-{:08x}-{:08x}{:016x}",
            secs,
            rng.next_u32(),
            rng.next_u64()
        );
        let old = headers
            .get("x-amzn-trace-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let v = if old.contains("Root=") {
            let rest: Vec<&str> = old
                .split(';')
                .filter(|f| !f.trim_start().starts_with("Self="))
                .collect();
            format!("Self={id};{}", rest.join(";"))
        } else if old.is_empty() {
            format!("Root={id}")
        } else {
            format!("Root={id};{old}")
        };
        let v = HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("Root=1-0-0"));
        headers.insert("x-amzn-trace-id", v.clone());
        v
    }

    pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
        for h in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
        ] {
            headers.remove(h);
        }
        if !keep_upgrade {
            headers.remove("upgrade");
        } else {
            headers.insert("connection", HeaderValue::from_static("upgrade"));
        }
    }
}

pub mod client {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use http_body_util::combinators::UnsyncBoxBody;
    use hyper_util::rt::TokioIo;

    use crate::proxy::error::ProxyError;

    pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
    pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

    #[derive(Clone, Debug)]
    pub struct ClientConfig {
        pub idle_timeout: Duration,
        pub connect_timeout: Duration,
    }

    impl Default for ClientConfig {
        fn default() -> Self {
            Self {
                idle_timeout: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(10),
            }
        }
    }

    pub struct TargetTls {
        pub server_name: String,
        pub verify: bool,
        pub ca_file: Option<std::path::PathBuf>,
    }

    pub struct TargetEndpoint {
        pub addr: SocketAddr,
        pub tls: Option<TargetTls>,
        pub http2: bool,
    }

    pub struct Forwarded {
        pub response: Response<ProxyBody>,
        pub reused_connection: bool,
        pub retried: bool,
        pub connect_time: Option<Duration>,
    }

    pub struct Forwarder {
        cfg: ClientConfig,
    }

    impl Forwarder {
        pub fn new(cfg: ClientConfig) -> Self {
            Self { cfg }
        }

        pub async fn forward(
            &self,
            ep: &TargetEndpoint,
            req: Request<ProxyBody>,
        ) -> Result<Forwarded, ProxyError> {
            let target = ep.addr.to_string();
            let start = Instant::now();
            let tcp = tokio::time::timeout(
                self.cfg.connect_timeout,
                tokio::net::TcpStream::connect(ep.addr),
            )
            .await
            .map_err(|_| ProxyError::ConnectTimeout {
                target: target.clone(),
            })?
            .map_err(|e| ProxyError::Connect {
                target: target.clone(),
                source: e.into(),
            })?;
            let connect_time = start.elapsed();
            let failed = |e: hyper::Error| ProxyError::TargetFailed {
                target: target.clone(),
                source: e.into(),
            };
            let fut = async {
                if ep.http2 {
                    let (mut send, conn) = hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        TokioIo::new(tcp),
                    )
                    .await
                    .map_err(failed)?;
                    tokio::spawn(conn);
                    send.send_request(req).await.map_err(failed)
                } else {
                    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                        .await
                        .map_err(failed)?;
                    tokio::spawn(conn.with_upgrades());
                    send.send_request(req).await.map_err(failed)
                }
            };
            let resp = tokio::time::timeout(self.cfg.idle_timeout, fut)
                .await
                .map_err(|_| ProxyError::TargetTimeout {
                    target: target.clone(),
                    timeout: self.cfg.idle_timeout,
                })??;
            Ok(Forwarded {
                response: resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
                reused_connection: false,
                retried: false,
                connect_time: Some(connect_time),
            })
        }
    }
}
