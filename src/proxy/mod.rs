//! Accept loop, CONNECT, interception, rewrite, upstream. (Stub: owned by the proxy work.)
