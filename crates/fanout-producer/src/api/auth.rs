//! Bearer tokens: each configured token names a tenant; a tenant sees only its own reports. An
//! admin token also sees every tenant's reports and may use the operator routes.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use fanout_core::{ApiToken, Role};
use sha2::{Digest, Sha256};

use super::ApiState;
use super::error::ApiError;

/// The tenant used when the API runs without tokens.
pub const OPEN_TENANT: &str = "default";

/// The tenant of an authenticated request, and whether its token is an admin's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tenant(pub(crate) String, pub(crate) Role);

impl Tenant {
    pub(crate) fn is_admin(&self) -> bool {
        self.1 == Role::Admin
    }

    /// Whether this caller may see `owner`'s reports.
    pub(crate) fn may_see(&self, owner: &str) -> bool {
        self.is_admin() || self.0 == owner
    }
}

/// A caller with an admin token: the operator routes (refused on an API without tokens).
#[derive(Debug, Clone)]
pub(crate) struct Admin(pub(crate) Tenant);

/// Token digests → tenants. Tokens are compared as SHA-256 digests in constant time, so
/// neither their length nor a common prefix leaks through timing.
#[derive(Clone, Default)]
pub(crate) struct Tokens {
    entries: Vec<([u8; 32], String, Role)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Tokens {
    pub(crate) fn new(tokens: &[ApiToken]) -> Self {
        Self {
            entries: tokens
                .iter()
                .map(|t| (digest(t.secret.expose()), t.tenant.clone(), t.role))
                .collect(),
        }
    }

    /// No tokens: the API is open.
    pub(crate) fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant and role of `token`, if it is one of ours.
    pub(crate) fn tenant(&self, token: &str) -> Option<(&str, Role)> {
        let d = digest(token);
        let mut found = None;
        // Look at every entry, so the time does not depend on which one matched.
        for (known, tenant, role) in &self.entries {
            if constant_time_eq(known, &d) {
                found = Some((tenant.as_str(), *role));
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
            // An open API (no tokens: local use) has nobody to tell apart, and no operator.
            return Ok(Tenant(OPEN_TENANT.to_owned(), Role::Tenant));
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
            Some((tenant, role)) => Ok(Tenant(tenant.to_owned(), role)),
            None => Err(ApiError::unauthorized("the bearer token is not valid")),
        }
    }
}

impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        if state.tokens().is_open() {
            // Anyone who reaches the port could replay, drop or read what operators see.
            return Err(ApiError::forbidden(
                "the API runs without tokens: operator routes need an admin token in FANOUT_API_TOKENS (`token=tenant:admin`); or use the CLI where Redis is reachable",
            ));
        }
        let caller = Tenant::from_request_parts(parts, state).await?;
        if caller.is_admin() {
            Ok(Admin(caller))
        } else {
            Err(ApiError::forbidden(
                "this route needs an admin token (`token=tenant:admin` in FANOUT_API_TOKENS)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_tenants() {
        let token = |secret: &str, tenant: &str, role| ApiToken {
            secret: fanout_core::Secret::new(secret),
            tenant: tenant.into(),
            role,
        };
        let t = Tokens::new(&[
            token("aaaaaaaaaaaaaaaa", "acme", Role::Tenant),
            token("bbbbbbbbbbbbbbbb", "globex", Role::Admin),
        ]);
        assert!(!t.is_open());
        assert_eq!(t.tenant("bbbbbbbbbbbbbbbb"), Some(("globex", Role::Admin)));
        assert_eq!(t.tenant("aaaaaaaaaaaaaaaa"), Some(("acme", Role::Tenant)));
        assert_eq!(t.tenant("aaaaaaaaaaaaaaa"), None);
        assert_eq!(t.tenant(""), None);
        assert!(!format!("{t:?}").contains("aaaa"));
        assert!(Tokens::new(&[]).is_open());
    }
}
