//! Who is asking: the platform admin (the configured admin token) or a tenant (a token the
//! admin created, stored only as its SHA-256). Tokens arrive as `Authorization: Bearer <token>`.
//!
//! Owns token generation, hashing and checking, and the access rules every route applies:
//! [`Principal::require_admin`] (403 for tenants) and [`Principal::scope`] (a tenant sees only
//! itself; another tenant's objects answer 404, never data). Knows nothing of routes.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::AdminState;
use super::error::ApiError;

/// Prefix of every tenant token, so a leaked one is recognisable in logs and scanners.
pub const TOKEN_PREFIX: &str = "weir_";

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The platform admin.
    Admin,
    /// A tenant, through one of its tokens.
    Tenant {
        /// The tenant.
        tenant: String,
        /// The token's public id.
        token_id: String,
    },
}

impl Principal {
    /// 403 unless the admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Tenant { .. } => Err(ApiError::forbidden(
                "this route is for the platform admin; a tenant token cannot use it",
            )),
        }
    }

    /// Whether the caller may act on `tenant`'s objects: the admin always; a tenant only on
    /// its own — any other tenant answers 404, as if it did not exist.
    pub fn scope(&self, tenant: &str) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Tenant { tenant: own, .. } if own == tenant => Ok(()),
            Principal::Tenant { .. } => Err(ApiError::not_found(format!("tenant {tenant}"))),
        }
    }

    /// The tenant a tenant token acts for.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Tenant { tenant, .. } => Some(tenant),
        }
    }
}

/// SHA-256 of a token, lower-case hex: what the store keeps.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `N` random bytes from the operating system.
fn random<const N: usize>() -> Result<[u8; N], ApiError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::internal("drawing random bytes", e))?;
    Ok(bytes)
}

/// A new token: its public id and its secret (`weir_<id>_<32 random bytes, base64url>`).
pub fn new_token() -> Result<(String, String), ApiError> {
    let id = hex::encode(random::<6>()?);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::<32>()?);
    Ok((id.clone(), format!("{TOKEN_PREFIX}{id}_{secret}")))
}

/// A new random id: 16 bytes, hex.
pub fn random_id() -> Result<String, ApiError> {
    Ok(hex::encode(random::<16>()?))
}

/// Compare two secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl FromRequestParts<Arc<AdminState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "unauthenticated",
                "missing `Authorization: Bearer <token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "unauthenticated",
                    "the Authorization header must be `Bearer <token>`",
                )
            })?;
        if let Some(admin) = &state.admin_token
            && same_secret(admin.expose().as_bytes(), token.as_bytes())
        {
            return Ok(Principal::Admin);
        }
        let invalid = || ApiError::unauthorized("invalid-token", "the token is not valid");
        if !token.starts_with(TOKEN_PREFIX) {
            return Err(invalid());
        }
        let record = state
            .store
            .token_by_hash(&token_hash(token))
            .await?
            .ok_or_else(invalid)?;
        if !record.is_valid_at(chrono::Utc::now()) {
            return Err(ApiError::unauthorized(
                "invalid-token",
                "the token was revoked or has expired",
            ));
        }
        Ok(Principal::Tenant {
            tenant: record.tenant,
            token_id: record.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_prefixed_and_hash_stably() {
        let (id, token) = new_token().unwrap();
        let (id2, token2) = new_token().unwrap();
        assert_ne!(token, token2);
        assert_ne!(id, id2);
        assert!(token.starts_with(&format!("{TOKEN_PREFIX}{id}_")));
        assert_eq!(token_hash(&token), token_hash(&token));
        assert_eq!(token_hash(&token).len(), 64);
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
    }

    #[test]
    fn tenants_see_only_themselves() {
        let acme = Principal::Tenant {
            tenant: "acme".into(),
            token_id: "t1".into(),
        };
        assert!(acme.scope("acme").is_ok());
        assert_eq!(
            acme.scope("globex").unwrap_err().status,
            axum::http::StatusCode::NOT_FOUND
        );
        assert_eq!(
            acme.require_admin().unwrap_err().status,
            axum::http::StatusCode::FORBIDDEN
        );
        assert!(Principal::Admin.scope("globex").is_ok());
    }
}
