//! `/healthz`, `/readyz`, `/metrics`. (Stub: owned by the proxy work.)
