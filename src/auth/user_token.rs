//! End-user tokens: JWTs signed HS256 with `HERALD_USER_TOKEN_SECRET`, claims `sub` (the
//! user id as a string) and `exp` (required). An app's backend mints one for its
//! signed-in user; Herald accepts it only on that user's own routes.
//!
//! Any other algorithm is refused, `none` included (jsonwebtoken does not even parse it),
//! and `exp` is checked without leeway: a token is valid until its `exp`, not a minute
//! after.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::AuthFailure;
use crate::domain::UserId;

/// The claims Herald reads.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Checks user tokens against the secret. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &SecretString) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            validation,
        }
    }

    /// The user a token speaks for.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthFailure> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthFailure::Expired,
                _ => AuthFailure::InvalidToken,
            },
        )?;
        data.claims
            .sub
            .parse::<i64>()
            .ok()
            .and_then(|id| UserId::new(id).ok())
            .ok_or(AuthFailure::InvalidToken)
    }
}

/// Whether a credential has a JWT's shape (three base64url parts), as opposed to an API
/// key or the admin token.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.split('.').count() == 3
        && credential
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Mints a token for `user` valid for `ttl` (what `herald users token` prints, and what an
/// app's backend does with any JWT library).
pub fn mint(secret: &SecretString, user: UserId, ttl: Duration) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + ttl.as_secs();
    let claims = Claims {
        sub: user.to_string(),
        exp,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretString {
        SecretString::from("test-user-token-secret".to_owned())
    }

    fn sign(header: &str, claims: &str, secret: &str) -> String {
        use hmac::{KeyInit, Mac};
        let encode =
            |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
        let input = format!("{}.{}", encode(header), encode(claims));
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(input.as_bytes());
        let signature = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            mac.finalize().into_bytes(),
        );
        format!("{input}.{signature}")
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_minted_token_verifies_as_its_user() {
        let token = mint(&secret(), UserId::new(42).unwrap(), Duration::from_secs(60)).unwrap();
        assert!(looks_like_jwt(&token));
        assert_eq!(
            Verifier::new(&secret()).verify(&token),
            Ok(UserId::new(42).unwrap())
        );
    }

    #[test]
    fn another_secret_an_expired_token_and_alg_none_are_refused() {
        let verifier = Verifier::new(&secret());
        let other = mint(
            &SecretString::from("another".to_owned()),
            UserId::new(42).unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(verifier.verify(&other), Err(AuthFailure::InvalidToken));

        let expired = format!(r#"{{"sub":"42","exp":{}}}"#, now() - 5);
        let expired = sign(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &expired,
            "test-user-token-secret",
        );
        assert_eq!(verifier.verify(&expired), Err(AuthFailure::Expired));

        let claims = format!(r#"{{"sub":"42","exp":{}}}"#, now() + 600);
        let encode =
            |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
        let none = format!(
            "{}.{}.",
            encode(r#"{"alg":"none","typ":"JWT"}"#),
            encode(&claims)
        );
        assert_eq!(verifier.verify(&none), Err(AuthFailure::InvalidToken));
        let hs512 = sign(
            r#"{"alg":"HS512","typ":"JWT"}"#,
            &claims,
            "test-user-token-secret",
        );
        assert_eq!(verifier.verify(&hs512), Err(AuthFailure::InvalidToken));
    }

    #[test]
    fn a_token_without_exp_or_with_a_non_numeric_sub_is_refused() {
        let verifier = Verifier::new(&secret());
        let no_exp = sign(
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"42"}"#,
            "test-user-token-secret",
        );
        assert_eq!(verifier.verify(&no_exp), Err(AuthFailure::InvalidToken));
        let claims = format!(r#"{{"sub":"alice","exp":{}}}"#, now() + 600);
        let alice = sign(r#"{"alg":"HS256"}"#, &claims, "test-user-token-secret");
        assert_eq!(verifier.verify(&alice), Err(AuthFailure::InvalidToken));
    }
}
