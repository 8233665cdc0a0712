//! Who is calling (DESIGN §5a): the bootstrap admin token, API keys with scopes, and
//! end-user tokens.
//!
//! [`Authenticator::authenticate`] turns the bearer credential of a request into a
//! [`Principal`] or an [`AuthFailure`] (always a 401). What a principal may do on each
//! route is decided by `api::auth`, which holds the route × scope table.
//!
//! - [`keys`]: API keys, stored as SHA-256 digests, checked through a short-lived cache so
//!   that a check costs microseconds and a revocation reaches every instance within
//!   [`keys::CACHE_TTL`].
//! - [`user_token`]: HS256 JWTs an app's backend mints for its signed-in user.

pub mod keys;
pub mod user_token;

use std::{fmt, str::FromStr, sync::Arc};

use crate::domain::UserId;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// What a credential may do. Each route needs one (`api::auth`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub enum Scope {
    /// Send notifications (the HTTP intake).
    #[serde(rename = "notifications:write")]
    NotificationsWrite,
    /// Read any notification and any user's history and inbox.
    #[serde(rename = "notifications:read")]
    NotificationsRead,
    /// Change the user directory, imports, preferences and read marks on a user's behalf.
    #[serde(rename = "users:write")]
    UsersWrite,
    /// Read the user directory and preferences.
    #[serde(rename = "users:read")]
    UsersRead,
    /// Create and cancel broadcasts.
    #[serde(rename = "broadcasts:write")]
    BroadcastsWrite,
    /// Read broadcasts.
    #[serde(rename = "broadcasts:read")]
    BroadcastsRead,
    /// Read the delivery dashboard.
    #[serde(rename = "dashboard:read")]
    DashboardRead,
    /// List, retry and discard dead letters.
    #[serde(rename = "dlq:admin")]
    DlqAdmin,
    /// Create, list and revoke API keys.
    #[serde(rename = "keys:admin")]
    KeysAdmin,
    /// Read template versions and preview templates.
    #[serde(rename = "templates:read")]
    TemplatesRead,
    /// Store template versions and choose the one in effect.
    #[serde(rename = "templates:write")]
    TemplatesWrite,
    /// List suppressed addresses and lift suppressions.
    #[serde(rename = "suppressions:admin")]
    SuppressionsAdmin,
    /// Create, list, enable and delete webhook endpoints, and read their delivery logs.
    #[serde(rename = "webhooks:admin")]
    WebhooksAdmin,
}

impl Scope {
    /// Every scope, in the order the documentation lists them.
    pub const ALL: [Scope; 13] = [
        Scope::NotificationsWrite,
        Scope::NotificationsRead,
        Scope::UsersWrite,
        Scope::UsersRead,
        Scope::BroadcastsWrite,
        Scope::BroadcastsRead,
        Scope::DashboardRead,
        Scope::DlqAdmin,
        Scope::KeysAdmin,
        Scope::TemplatesRead,
        Scope::TemplatesWrite,
        Scope::SuppressionsAdmin,
        Scope::WebhooksAdmin,
    ];

    /// The scope's name, as keys carry it (`notifications:write`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::NotificationsWrite => "notifications:write",
            Scope::NotificationsRead => "notifications:read",
            Scope::UsersWrite => "users:write",
            Scope::UsersRead => "users:read",
            Scope::BroadcastsWrite => "broadcasts:write",
            Scope::BroadcastsRead => "broadcasts:read",
            Scope::DashboardRead => "dashboard:read",
            Scope::DlqAdmin => "dlq:admin",
            Scope::KeysAdmin => "keys:admin",
            Scope::TemplatesRead => "templates:read",
            Scope::TemplatesWrite => "templates:write",
            Scope::SuppressionsAdmin => "suppressions:admin",
            Scope::WebhooksAdmin => "webhooks:admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s.trim())
            .ok_or_else(|| {
                let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown scope {s:?}; scopes are {}", known.join(", "))
            })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `HERALD_ADMIN_TOKEN`: every scope.
    Admin,
    /// An API key.
    Key(Arc<keys::ApiKey>),
    /// An end user, through a user token: only that user's own routes.
    User(UserId),
}

impl Principal {
    /// Whether the principal holds `scope` (a user token holds none).
    pub fn has(&self, scope: Scope) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Key(key) => key.scopes.contains(&scope),
            Principal::User(_) => false,
        }
    }

    /// The name audit fields record: `admin`, the key's name, or `user:ID`.
    pub fn name(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Key(key) => key.name.clone(),
            Principal::User(user) => format!("user:{user}"),
        }
    }

    /// The credential's stable identity, which scopes Idempotency-Keys: `admin`,
    /// `key:ID` or `user:ID`. A key's name may repeat; its id does not.
    pub fn credential(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Key(key) => format!("key:{}", key.id),
            Principal::User(user) => format!("user:{user}"),
        }
    }

    /// The scopes the principal holds.
    pub fn scopes(&self) -> Vec<Scope> {
        Scope::ALL.into_iter().filter(|s| self.has(*s)).collect()
    }
}

/// Why a credential was refused. Every reason is a 401; the reason is a metric label and
/// a message for the caller, never the credential itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization` header (or `?token=` where one is accepted).
    Missing,
    /// Not `Bearer <credential>`, or not a credential Herald issues.
    Malformed,
    /// An API key Herald does not know.
    UnknownKey,
    /// A revoked API key.
    Revoked,
    /// A user token past its `exp`.
    Expired,
    /// A user token that is not HS256 signed with the configured secret, or lacks claims.
    InvalidToken,
    /// A user token, but `HERALD_USER_TOKEN_SECRET` is not set.
    UserTokensDisabled,
}

impl AuthFailure {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::Revoked => "revoked",
            AuthFailure::Expired => "expired",
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::UserTokensDisabled => "user_tokens_disabled",
        }
    }

    /// What the caller is told.
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => {
                "send a credential: Authorization: Bearer <API key, admin token or user token>"
            }
            AuthFailure::Malformed => "the credential is not one Herald issues",
            AuthFailure::UnknownKey => "the API key is not valid",
            AuthFailure::Revoked => "the API key has been revoked",
            AuthFailure::Expired => "the user token has expired",
            AuthFailure::InvalidToken => "the user token is not valid",
            AuthFailure::UserTokensDisabled => {
                "user tokens are not accepted: HERALD_USER_TOKEN_SECRET is not set"
            }
        }
    }
}

/// Checks credentials. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    admin_digest: Option<[u8; 32]>,
    user_tokens: Option<user_token::Verifier>,
    keys: keys::KeyCache,
}

/// The outcome of a check that could not be made (PostgreSQL unreachable while a key was
/// not cached): neither a yes nor a no.
#[derive(Debug, thiserror::Error)]
#[error("cannot check the credential now")]
pub struct Unavailable(#[source] pub anyhow::Error);

impl Authenticator {
    /// An authenticator over the keys in `db`, the admin token and the user-token secret.
    pub fn new(
        db: PgPool,
        admin_token: Option<&SecretString>,
        user_token_secret: Option<&SecretString>,
    ) -> Self {
        Authenticator {
            admin_digest: admin_token.map(|t| digest(t.expose_secret())),
            user_tokens: user_token_secret.map(user_token::Verifier::new),
            keys: keys::KeyCache::new(db),
        }
    }

    /// The key cache, so that a revocation here applies at once on this instance.
    pub fn keys(&self) -> &keys::KeyCache {
        &self.keys
    }

    /// Who `credential` (the text after `Bearer `) is.
    pub async fn authenticate(
        &self,
        credential: &str,
    ) -> Result<Result<Principal, AuthFailure>, Unavailable> {
        let credential = credential.trim();
        if credential.is_empty() {
            return Ok(Err(AuthFailure::Missing));
        }
        let presented = digest(credential);
        // Comparing digests keeps the comparison's time independent of where they differ.
        if self.admin_digest == Some(presented) {
            return Ok(Ok(Principal::Admin));
        }
        if credential.starts_with(keys::KEY_PREFIX) {
            return self.keys.check(presented).await;
        }
        if user_token::looks_like_jwt(credential) {
            return Ok(match &self.user_tokens {
                Some(verifier) => verifier.verify(credential).map(Principal::User),
                None => Err(AuthFailure::UserTokensDisabled),
            });
        }
        Ok(Err(AuthFailure::Malformed))
    }
}

/// SHA-256 of a credential.
pub fn digest(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}
