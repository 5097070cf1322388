//! TLS 1.3 for the connections of agents with a secret (a shared one, or their user's per-host
//! one): settings, certificates and the rustls configurations built from them (the handshake
//! itself is in [`super::auth`], the record I/O in [`super::link`]).
//!
//! rustls has no external-PSK support, so the TLS layer does not authenticate by itself: each
//! listener presents a certificate (an ephemeral self-signed one made once per process, or the
//! one `[tls]` names), and the agents then prove the secret to each other inside the channel,
//! bound to its exporter value ([`super::auth`] explains why that stops relays). With
//! `[tls]` certificates both sides also present and verify certificates against the named CA
//! (mutual TLS), which limits who can be an endpoint at all to holders of CA-issued keys.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// What TLS protects on a connection of an agent with a secret.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Encryption and integrity (AES-GCM or ChaCha20-Poly1305): the default.
    #[default]
    Encrypt,
    /// Integrity without encryption. Refused by [`TlsSettings::check`]: TLS 1.3 (and rustls)
    /// has no integrity-only cipher suite, and this crate does not fake one.
    IntegrityOnly,
}

impl TlsMode {
    /// Parses `"encrypt"` or `"integrity-only"`.
    pub(crate) fn parse(s: &str) -> Result<TlsMode, String> {
        match s {
            "encrypt" => Ok(TlsMode::Encrypt),
            "integrity-only" => Ok(TlsMode::IntegrityOnly),
            other => Err(format!(
                "[tls] mode {other:?}: expected \"encrypt\" or \"integrity-only\" (there is no \
                 mode without protection: without [auth] secret connections are plain)"
            )),
        }
    }
}

/// Certificate files named in `[tls]`: PEM certificate chain, its private key, and the CA
/// bundle peers' certificates must chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// TLS settings of an agent (used only when it has a secret; certificate files only with a
/// shared one).
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    pub mode: TlsMode,
    /// `None`: an ephemeral self-signed certificate per process, not verified by peers (the
    /// shared-secret proof authenticates).
    pub files: Option<CertFiles>,
    built: Arc<OnceLock<Result<Configs, String>>>,
}

impl PartialEq for TlsSettings {
    fn eq(&self, o: &Self) -> bool {
        self.mode == o.mode && self.files == o.files
    }
}

/// The rustls configurations of one [`TlsSettings`].
#[derive(Clone, Debug)]
pub(super) struct Configs {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
}

impl TlsSettings {
    /// Settings with this mode and these certificate files.
    pub fn new(mode: TlsMode, files: Option<CertFiles>) -> TlsSettings {
        TlsSettings {
            mode,
            files,
            built: Arc::default(),
        }
    }

    /// Whether these settings can be used: the mode is one this crate implements and the files
    /// are readable and consistent.
    pub fn check(&self) -> Result<(), String> {
        self.configs().map(drop)
    }

    /// The rustls configurations, built once.
    pub(super) fn configs(&self) -> Result<Configs, String> {
        self.built.get_or_init(|| build(self)).clone()
    }
}

/// The label of the exporter value the shared-secret proofs are computed over.
pub(super) const EXPORTER_LABEL: &[u8] = b"EXPORTER-nixl-tcp-auth-v2";
/// The server name the initiator asks for (not checked: agents are not DNS names).
const SERVER_NAME: &str = "nixl-agent";

fn provider() -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    // TLS 1.3 only; AES-128-GCM first (fastest with AES-NI, and both ends are ours).
    use rustls::crypto::ring::cipher_suite as cs;
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    p
}

/// A certificate chain and its key.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn ephemeral() -> Result<Identity, String> {
    static EPHEMERAL: OnceLock<Result<(CertificateDer<'static>, Vec<u8>), String>> =
        OnceLock::new();
    let (cert, key) = EPHEMERAL
        .get_or_init(|| {
            let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
                .map_err(|e| format!("cannot make an ephemeral tls certificate: {e}"))?;
            Ok((ck.cert.der().clone(), ck.signing_key.serialize_der()))
        })
        .clone()?;
    let key = PrivateKeyDer::try_from(key).map_err(|e| format!("ephemeral tls key: {e}"))?;
    Ok((vec![cert], key))
}

fn read_files(f: &CertFiles) -> Result<(Identity, RootCertStore), String> {
    let at = |what: &str, p: &Path| format!("[tls] {what} {}", p.display());
    let pem = |what: &str, p: &Path| {
        std::fs::read(p).map_err(|e| format!("{}: cannot read it: {e}", at(what, p)))
    };
    let chain = CertificateDer::pem_slice_iter(&pem("cert", &f.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", at("cert", &f.cert)))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", at("cert", &f.cert)));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem("key", &f.key)?)
        .map_err(|e| format!("{}: {e}", at("key", &f.key)))?;
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_slice_iter(&pem("ca", &f.ca)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", at("ca", &f.ca)))?;
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(format!(
            "{}: no usable CA certificate in it",
            at("ca", &f.ca)
        ));
    }
    Ok(((chain, key), roots))
}

fn build(s: &TlsSettings) -> Result<Configs, String> {
    if s.mode == TlsMode::IntegrityOnly {
        return Err(
            "[tls] mode \"integrity-only\" is not available: TLS 1.3 has no \
                    integrity-only cipher suite and rustls offers none, so connections of an \
                    agent with a secret are always encrypted (mode = \"encrypt\")"
                .into(),
        );
    }
    let provider = Arc::new(provider());
    let algs = provider.signature_verification_algorithms;
    let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let (ident, roots) = match &s.files {
        Some(f) => {
            let (ident, roots) = read_files(f)?;
            (ident, Some(Arc::new(roots)))
        }
        None => (ephemeral()?, None),
    };
    let err = |e: rustls::Error| format!("tls configuration: {e}");

    let verifier = Arc::new(PeerCert {
        roots: roots.clone(),
        algs,
    });
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(tls13)
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut client = match &s.files {
        Some(_) => builder
            .with_client_auth_cert(ident.0.clone(), ident.1.clone_key())
            .map_err(err)?,
        None => builder.with_no_client_auth(),
    };
    client.enable_sni = false;
    client.resumption = rustls::client::Resumption::disabled();

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(tls13)
        .map_err(err)?;
    let builder = match &roots {
        Some(r) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::clone(r), Arc::clone(&provider))
                .build()
                .map_err(|e| format!("tls client verifier: {e}"))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(ident.0, ident.1).map_err(err)?;
    server.send_tls13_tickets = 0;
    Ok(Configs {
        client: Arc::new(client),
        server: Arc::new(server),
    })
}

/// The server name a client connection is made for.
pub(super) fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// Verifies a listener's certificate: with `[tls]` certificates, that it chains to the CA (the
/// name is not checked: agent names are bound by the shared-secret proof); without, anything
/// (the ephemeral certificate only carries the handshake's key exchange signature, which is
/// still checked).
#[derive(Debug)]
struct PeerCert {
    roots: Option<Arc<RootCertStore>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PeerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algs.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "nixl-rs agents speak TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
