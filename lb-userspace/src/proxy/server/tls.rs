//! TLS for HTTPS listeners: certificate loading, SNI certificate selection, the rustls server
//! configuration (ALPN `h2`/`http/1.1`, TLS 1.2/1.3, AEAD suites only).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// One certificate of an HTTPS listener: PEM certificate chain and PEM private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateSpec {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Loading or using a listener certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    /// The key file holds no private key.
    #[error("{0}: no private key found")]
    NoKey(PathBuf),
    /// rustls refused the key or the configuration.
    #[error("{path}: {source}")]
    Rustls {
        /// The key or certificate file concerned.
        path: PathBuf,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
    /// An HTTPS listener needs at least one certificate.
    #[error("an HTTPS listener needs at least one certificate")]
    NoCertificates,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The crypto provider of every TLS session `lb` makes (listeners and TLS targets): aws-lc-rs,
/// whose full handshake costs the server less than ring's (102 against 120 µs of CPU in
/// `examples/tls_handshake_cpu.rs`, mostly X25519) and whose random numbers come from a
/// user-space DRBG (ring made one getrandom(2) call per random value: 9 per handshake).
/// Key exchange groups X25519, P-256 and P-384, in that order: what ALB's default policy and
/// the ring provider offered. aws-lc-rs's defaults add the X25519MLKEM768 hybrid, which is
/// left out so that what clients negotiate does not change with the provider.
pub fn base_provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::kx_group;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    p
}

/// The crypto provider for listeners: [`base_provider`] restricted to AEAD cipher suites (its
/// defaults have no CBC suite today; the filter keeps it that way if one is ever added), in
/// the order of ALB's default security policy (ELBSecurityPolicy-TLS13-1-2-2021-06): AES-128-GCM
/// before AES-256-GCM, ChaCha20-Poly1305 last. Listeners choose in this order, whatever the
/// client's order ([`server_config`] sets server preference, as ELB does).
pub fn provider() -> CryptoProvider {
    let mut p = base_provider();
    p.cipher_suites
        .retain(|s| !format!("{:?}", s.suite()).contains("CBC"));
    p.cipher_suites.sort_by_key(|s| alb_rank(s.suite()));
    p
}

/// A suite's place in ALB's order (lower first): TLS 1.3 before TLS 1.2, then AES-128-GCM,
/// AES-256-GCM, ChaCha20-Poly1305, ECDSA before RSA.
fn alb_rank(suite: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as C;
    match suite {
        C::TLS13_AES_128_GCM_SHA256 => 0,
        C::TLS13_AES_256_GCM_SHA384 => 1,
        C::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 10,
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 11,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => 12,
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 13,
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => 14,
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 15,
        _ => 20,
    }
}

/// Chooses the certificate by SNI: exact SAN match first, then wildcard SAN (`*.example.com`
/// matches exactly one label), else the default (first) certificate, as ALB does.
#[derive(Debug)]
pub struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
    /// Exact SAN → index into `keys`.
    exact: HashMap<String, usize>,
    /// Wildcard SANs by their suffix (`example.com` for `*.example.com`) → index.
    wildcard: HashMap<String, usize>,
}

impl SniResolver {
    /// Builds the resolver from loaded keys; the first is the default. Names are taken from the
    /// leaf certificate's subjectAltName dNSName entries. When two certificates claim the same
    /// name, the earlier one wins.
    pub fn new(keys: Vec<Arc<CertifiedKey>>) -> Result<Self, TlsError> {
        if keys.is_empty() {
            return Err(TlsError::NoCertificates);
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let Some(leaf) = key.cert.first() else {
                continue;
            };
            for name in san_dns_names(leaf.as_ref()) {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(suffix) => {
                        wildcard.entry(suffix.to_owned()).or_insert(i);
                    }
                    None => {
                        exact.entry(name).or_insert(i);
                    }
                }
            }
        }
        Ok(Self {
            keys,
            exact,
            wildcard,
        })
    }

    /// Which certificate (its index in the listener's list) serves an SNI name (or none).
    pub fn choose_index(&self, sni: Option<&str>) -> usize {
        let Some(name) = sni else {
            return 0;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(&k) = self.exact.get(&name) {
            return k;
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(&k) = self.wildcard.get(parent)
        {
            return k;
        }
        0
    }

    /// The certificate for an SNI name (or for none).
    pub fn choose(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        self.keys[self.choose_index(sni)].clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(hello.server_name()))
    }
}

/// Loads one certificate chain and key.
pub fn load(
    spec: &CertificateSpec,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_pem = read(&spec.cert)?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: spec.cert.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(spec.cert.clone()));
    }
    let key_pem = read(&spec.key)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: spec.key.clone(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(spec.key.clone()))?;
    let ck = CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Rustls {
        path: spec.key.clone(),
        source,
    })?;
    Ok(Arc::new(ck))
}

/// The rustls server configuration of an HTTPS listener.
pub fn server_config(certs: &[CertificateSpec]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with_resolver(certs).map(|(c, _)| c)
}

/// [`server_config`] and its certificate resolver (to tell which certificate a connection
/// got, for the access log's `chosen_cert_arn`).
pub fn server_config_with_resolver(
    certs: &[CertificateSpec],
) -> Result<(Arc<rustls::ServerConfig>, Arc<SniResolver>), TlsError> {
    let provider = Arc::new(provider());
    let keys = certs
        .iter()
        .map(|c| load(c, &provider))
        .collect::<Result<Vec<_>, _>>()?;
    let resolver = Arc::new(SniResolver::new(keys)?);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Rustls {
            path: PathBuf::new(),
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // ELB negotiates in its policy's order (server order preference), not the client's.
    cfg.ignore_client_order = true;
    Ok((Arc::new(cfg), resolver))
}

/// Reads one DER TLV at the start of `data`: (tag, content, rest).
fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subjectAltName dNSName entries of a DER certificate (empty if it has none or does not
/// parse; such a certificate can still serve as the default).
pub fn san_dns_names(der: &[u8]) -> Vec<String> {
    const SEQUENCE: u8 = 0x30;
    const EXTENSIONS: u8 = 0xa3;
    const OID: u8 = 0x06;
    const OCTET_STRING: u8 = 0x04;
    const DNS_NAME: u8 = 0x82;
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
    let mut names = Vec::new();
    let mut parse = || -> Option<()> {
        let (SEQUENCE, cert, _) = tlv(der)? else {
            return None;
        };
        let (SEQUENCE, mut tbs, _) = tlv(cert)? else {
            return None;
        };
        while !tbs.is_empty() {
            let (tag, content, rest) = tlv(tbs)?;
            tbs = rest;
            if tag != EXTENSIONS {
                continue;
            }
            let (SEQUENCE, mut exts, _) = tlv(content)? else {
                return None;
            };
            while !exts.is_empty() {
                let (_, ext, rest) = tlv(exts)?;
                exts = rest;
                let (OID, oid, mut ext) = tlv(ext)? else {
                    continue;
                };
                if oid != SAN_OID {
                    continue;
                }
                while !ext.is_empty() {
                    let (tag, value, rest) = tlv(ext)?;
                    ext = rest;
                    if tag != OCTET_STRING {
                        continue;
                    }
                    let (SEQUENCE, mut general, _) = tlv(value)? else {
                        return None;
                    };
                    while !general.is_empty() {
                        let (tag, name, rest) = tlv(general)?;
                        general = rest;
                        if tag == DNS_NAME
                            && let Ok(n) = std::str::from_utf8(name)
                        {
                            names.push(n.to_owned());
                        }
                    }
                }
            }
        }
        Some(())
    };
    let _ = parse();
    names
}

/// OpenSSL's name of a cipher suite, as ALB logs it in `ssl_cipher` (`-` for one rustls
/// knows and OpenSSL has no name for here).
pub fn openssl_cipher_name(suite: rustls::CipherSuite) -> &'static str {
    use rustls::CipherSuite as C;
    match suite {
        C::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        C::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        C::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        _ => "-",
    }
}

/// `TLSv1.2` / `TLSv1.3`, as ALB logs `ssl_protocol`.
pub fn protocol_name(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_for(names: &[&str]) -> Arc<CertifiedKey> {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let ck = rcgen::generate_simple_self_signed(names).expect("generate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        Arc::new(
            CertifiedKey::from_der(vec![ck.cert.der().clone()], key, &provider()).expect("key"),
        )
    }

    #[test]
    fn san_dns_names_are_extracted_including_wildcards() {
        let k = key_for(&["a.example.com", "*.b.example.com"]);
        let names = san_dns_names(k.cert[0].as_ref());
        assert_eq!(names, ["a.example.com", "*.b.example.com"]);
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let default = key_for(&["default.test"]);
        let a = key_for(&["a.test"]);
        let wild = key_for(&["*.w.test"]);
        let r = SniResolver::new(vec![default.clone(), a.clone(), wild.clone()]).expect("resolver");
        assert!(Arc::ptr_eq(&r.choose(Some("A.test")), &a));
        assert!(Arc::ptr_eq(&r.choose(Some("x.w.test")), &wild));
        // A wildcard covers exactly one label.
        assert!(Arc::ptr_eq(&r.choose(Some("w.test")), &default));
        assert!(Arc::ptr_eq(&r.choose(Some("y.x.w.test")), &default));
        assert!(Arc::ptr_eq(&r.choose(Some("unknown.test")), &default));
        assert!(Arc::ptr_eq(&r.choose(None), &default));
    }

    #[test]
    fn key_exchange_groups_are_x25519_p256_p384_in_that_order() {
        use rustls::NamedGroup as G;
        let groups: Vec<G> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups, [G::X25519, G::secp256r1, G::secp384r1]);
        // The provider's own defaults offer more (the post-quantum hybrid): the pin matters.
        let defaults = rustls::crypto::aws_lc_rs::default_provider()
            .kx_groups
            .len();
        assert!(defaults > groups.len(), "{defaults}");
    }

    #[test]
    fn only_aead_suites_and_modern_versions() {
        let p = provider();
        assert!(!p.cipher_suites.is_empty());
        for s in &p.cipher_suites {
            let name = format!("{:?}", s.suite());
            assert!(
                name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
                "{name}"
            );
        }
    }
}
