//! TLS to targets (HTTPS target groups).
//!
//! ALB does not verify target certificates: any certificate is accepted, self-signed and
//! expired ones included. We do the same by default, but still check the handshake signature,
//! so the connection is at least encrypted to whoever holds the presented key. `verify: true`
//! verifies the target's chain and name against the CAs in `ca_file`.
use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{BoxError, TargetTls};

/// Builds the rustls client configuration for a TLS target, offering `alpn` (`h2` or
/// `http/1.1`: one protocol, the one the target group is configured for).
pub fn client_config(tls: &TargetTls, alpn: &[u8]) -> Result<Arc<ClientConfig>, BoxError> {
    let provider = Arc::new(crate::proxy::server::tls::base_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let mut config = if tls.verify {
        let Some(ca_file) = &tls.ca_file else {
            return Err("target certificate verification needs a CA file (ca_file)".into());
        };
        let mut roots = RootCertStore::empty();
        let file = File::open(ca_file)
            .map_err(|e| format!("opening CA file {}: {e}", ca_file.display()))?;
        for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
            let cert = cert.map_err(|e| format!("reading CA file {}: {e}", ca_file.display()))?;
            roots.add(cert)?;
        }
        if roots.is_empty() {
            return Err(format!("CA file {} holds no certificate", ca_file.display()).into());
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The name to send in SNI and, when verifying, to check the certificate against.
pub fn server_name(
    tls: &TargetTls,
    addr: std::net::SocketAddr,
) -> Result<ServerName<'static>, BoxError> {
    if tls.server_name.is_empty() {
        return Ok(ServerName::IpAddress(addr.ip().into()));
    }
    Ok(ServerName::try_from(tls.server_name.clone())?)
}

/// Accepts any certificate chain (as ALB does for targets) but verifies that the server holds
/// the key of the certificate it presented.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
