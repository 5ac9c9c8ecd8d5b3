//! The `impersonate-proxy` command line. (Stub.)

fn main() {
    impersonate_proxy::install_crypto_provider();
}
