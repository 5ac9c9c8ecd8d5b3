//! Offline IAM Credentials + OAuth2 + metadata server. (Stub: owned by the emulator work.)
