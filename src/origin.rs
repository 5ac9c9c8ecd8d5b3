//! A local TLS origin that records what it receives. (Stub: owned by the proxy work.)
