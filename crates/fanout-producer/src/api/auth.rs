//! Bearer tokens: each configured token names a tenant; a tenant sees only its own reports.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use fanout_core::Secret;
use sha2::{Digest, Sha256};

use super::ApiState;
use super::error::ApiError;

/// The tenant used when the API runs without tokens.
pub const OPEN_TENANT: &str = "default";

/// The tenant of an authenticated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tenant(pub(crate) String);

/// Token digests → tenants. Tokens are compared as SHA-256 digests in constant time, so
/// neither their length nor a common prefix leaks through timing.
#[derive(Clone, Default)]
pub(crate) struct Tokens {
    entries: Vec<([u8; 32], String)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Tokens {
    pub(crate) fn new(tokens: &[(Secret, String)]) -> Self {
        Self {
            entries: tokens
                .iter()
                .map(|(secret, tenant)| (digest(secret.expose()), tenant.clone()))
                .collect(),
        }
    }

    /// No tokens: the API is open.
    pub(crate) fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant of `token`, if it is one of ours.
    pub(crate) fn tenant(&self, token: &str) -> Option<&str> {
        let d = digest(token);
        let mut found = None;
        // Look at every entry, so the time does not depend on which one matched.
        for (known, tenant) in &self.entries {
            if constant_time_eq(known, &d) {
                found = Some(tenant.as_str());
            }
        }
        found
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FromRequestParts<ApiState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let tokens = state.tokens();
        if tokens.is_open() {
            return Ok(Tenant(OPEN_TENANT.to_owned()));
        }
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "missing `authorization: Bearer <token>` header",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = token else {
            return Err(ApiError::unauthorized(
                "the `authorization` header must be `Bearer <token>`",
            ));
        };
        match tokens.tenant(token) {
            Some(tenant) => Ok(Tenant(tenant.to_owned())),
            None => Err(ApiError::unauthorized("the bearer token is not valid")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_tenants() {
        let t = Tokens::new(&[
            (Secret::new("aaaaaaaaaaaaaaaa"), "acme".into()),
            (Secret::new("bbbbbbbbbbbbbbbb"), "globex".into()),
        ]);
        assert!(!t.is_open());
        assert_eq!(t.tenant("bbbbbbbbbbbbbbbb"), Some("globex"));
        assert_eq!(t.tenant("aaaaaaaaaaaaaaaa"), Some("acme"));
        assert_eq!(t.tenant("aaaaaaaaaaaaaaa"), None);
        assert_eq!(t.tenant(""), None);
        assert!(!format!("{t:?}").contains("aaaa"));
        assert!(Tokens::new(&[]).is_open());
    }
}
