//! Errors of the request path. Each records which side failed and whether a retry is safe
//! (as pingora's `Error { etype, esource, retry }`), which is what maps cleanly to the status
//! ALB would return and to the access-log fields.
use std::time::Duration;

use http::StatusCode;

use crate::accesslog::LbError;

/// Which party caused the failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client (malformed request, went away, too slow).
    Client,
    /// The target (refused, reset, timed out, malformed response).
    Target,
    /// The load balancer itself.
    Internal,
}

/// A failure on the request path.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Malformed request, header limits exceeded, severe desync class (400).
    #[error("bad request: {reason}")]
    BadRequest {
        /// Short machine-friendly reason, also logged.
        reason: &'static str,
    },
    /// The client sent nothing before the idle timeout (408).
    #[error("client sent no request within {0:?}")]
    ClientTimeout(Duration),
    /// The client closed the connection before the response (460; nothing is sent).
    #[error("client closed the connection")]
    ClientClosed,
    /// More than 30 X-Forwarded-For addresses (463).
    #[error("X-Forwarded-For has {0} addresses (limit 30)")]
    TooManyForwardedFor(usize),
    /// Method TRACE (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Transfer-Encoding other than chunked/identity (501).
    #[error("unsupported transfer-encoding")]
    NotImplemented,
    /// Unsupported HTTP version (505).
    #[error("unsupported HTTP version")]
    VersionNotSupported,
    /// Request protocol does not fit the target group's protocol version (464).
    #[error("request protocol does not fit the target group")]
    ProtocolMismatch,
    /// The target group has no target in service (503).
    #[error("no target in service in target group {group}")]
    NoTarget {
        /// The target group.
        group: String,
    },
    /// Could not connect to the target: refused, unreachable, or TLS failed (502).
    #[error("connecting to target {target}: {source}")]
    Connect {
        /// `addr:port` of the target.
        target: String,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No connection to the target within the connect timeout (504).
    #[error("connecting to target {target} timed out")]
    ConnectTimeout {
        /// `addr:port` of the target.
        target: String,
    },
    /// The target reset/closed with the request outstanding, or sent a malformed or oversized
    /// response (502).
    #[error("target {target} failed: {source}")]
    TargetFailed {
        /// `addr:port` of the target.
        target: String,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No response from the target within the idle timeout (504).
    #[error("target {target} sent no response within {timeout:?}")]
    TargetTimeout {
        /// `addr:port` of the target.
        target: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The target's deregistration delay ended with the request still open (502, as ALB:
    /// what is still open when the delay ends is closed).
    #[error("target {target} left its group (deregistration delay over) mid-request")]
    DrainExpired {
        /// `addr:port` of the target.
        target: String,
    },
    /// A bug or resource failure in the load balancer (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The status the load balancer answers with (460: recorded, nothing sent).
    pub fn status(&self) -> StatusCode {
        let code = match self {
            Self::BadRequest { .. } => 400,
            Self::ClientTimeout(_) => 408,
            Self::ClientClosed => 460,
            Self::TooManyForwardedFor(_) => 463,
            Self::MethodNotAllowed => 405,
            Self::NotImplemented => 501,
            Self::VersionNotSupported => 505,
            Self::ProtocolMismatch => 464,
            Self::NoTarget { .. } => 503,
            Self::Connect { .. } | Self::TargetFailed { .. } | Self::DrainExpired { .. } => 502,
            Self::ConnectTimeout { .. } | Self::TargetTimeout { .. } => 504,
            Self::Internal(_) => 500,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            Self::BadRequest { .. }
            | Self::ClientTimeout(_)
            | Self::ClientClosed
            | Self::TooManyForwardedFor(_)
            | Self::MethodNotAllowed
            | Self::NotImplemented
            | Self::VersionNotSupported
            | Self::ProtocolMismatch => Side::Client,
            Self::NoTarget { .. } | Self::Internal(_) | Self::DrainExpired { .. } => Side::Internal,
            Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::TargetFailed { .. }
            | Self::TargetTimeout { .. } => Side::Target,
        }
    }
}

/// A failed TLS handshake with a target, as the source of [`ProxyError::Connect`]
/// (TargetTLSNegotiationErrorCount tells it apart from a refused connection by this type).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake: {0}")]
pub struct TargetTlsError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl ProxyError {
    /// The access log's `lb_error_reason` (and the metrics that count target connection and
    /// TLS failures).
    pub fn lb_error(&self) -> LbError {
        match self {
            Self::BadRequest { .. }
            | Self::ClientTimeout(_)
            | Self::TooManyForwardedFor(_)
            | Self::MethodNotAllowed
            | Self::NotImplemented
            | Self::VersionNotSupported
            | Self::ProtocolMismatch => LbError::ClientRequest,
            Self::ClientClosed => LbError::ClientClosed,
            Self::NoTarget { .. } => LbError::NoTarget,
            Self::Internal(_) => LbError::Internal,
            Self::DrainExpired { .. } => LbError::TargetDrainExpired,
            Self::ConnectTimeout { .. } => LbError::TargetConnectTimeout,
            Self::TargetFailed { .. } => LbError::TargetResponseFailed,
            Self::TargetTimeout { .. } => LbError::TargetResponseTimeout,
            Self::Connect { source, .. } => {
                if source.is::<TargetTlsError>() {
                    return LbError::TargetTlsNegotiation;
                }
                let refused = source
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
                if refused {
                    LbError::TargetConnectRefused
                } else {
                    LbError::TargetConnectFailed
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_failures_map_to_502_and_504() {
        let e = ProxyError::TargetTimeout {
            target: "127.0.0.1:1".into(),
            timeout: Duration::from_secs(60),
        };
        assert_eq!(e.status().as_u16(), 504);
        assert_eq!(e.side(), Side::Target);
        let e = ProxyError::Connect {
            target: "127.0.0.1:1".into(),
            source: "refused".into(),
        };
        assert_eq!(e.status().as_u16(), 502);
        assert_eq!(e.lb_error(), LbError::TargetConnectFailed);
        let e = ProxyError::Connect {
            target: "127.0.0.1:1".into(),
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        assert_eq!(e.lb_error(), LbError::TargetConnectRefused);
        let e = ProxyError::Connect {
            target: "127.0.0.1:1".into(),
            source: Box::new(TargetTlsError("bad certificate".into())),
        };
        assert_eq!(e.lb_error(), LbError::TargetTlsNegotiation);
    }
}
