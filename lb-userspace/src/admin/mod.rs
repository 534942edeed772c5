//! The admin API of a running `lb run`: typed requests named after the AWS API ([`api`]),
//! served over HTTP on a Unix socket (mode 0600) and optionally on a loopback TCP address
//! that requires a bearer token ([`server`]); [`client`] is what `lb targets …`,
//! `lb groups …`, `lb listeners` and `lb rules …` use.
//!
//! Protocol: `POST /` with one JSON request (`{"Action": "RegisterTargets", …}`); the answer
//! is the JSON response, or `{"Error": {"Code": …, "Message": …}}` with a 4xx/5xx status.
//! `curl --unix-socket /run/lb/admin.sock -d '{"Action":"DescribeTargetHealth"}' http://lb/`
//! works too.
pub mod api;
pub mod client;
pub mod server;

pub use api::{ApiError, Request, Response};
pub use client::{Endpoint, call};
pub use server::{AdminError, AdminServer, Handler};
