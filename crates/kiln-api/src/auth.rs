//! API keys: `X-API-KEY` on every control request names the caller's team.
//! Only a key's SHA-256 is stored.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::app::App;
use crate::db::Team;
use crate::error::ApiError;
use crate::util::sha256_hex;

/// The authenticated caller.
pub struct Caller(pub Team);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("missing API key (X-API-KEY header)".into()))?;
        let hash = sha256_hex(key);
        match app.db.team_of_key(&hash).await? {
            Some(team) => {
                let db = app.db.clone();
                // Last use is informative only: never slow a request down for it.
                tokio::spawn(async move {
                    let _ = db.touch_key(&hash).await;
                });
                Ok(Caller(team))
            }
            None => Err(ApiError::Unauthorized("Invalid API key".into())),
        }
    }
}

/// Creates a key for `team` and returns it: the only time it is seen whole.
pub async fn create_key(
    app_db: &crate::db::Db,
    team: &Team,
    name: &str,
) -> Result<(String, String), ApiError> {
    let key = crate::util::new_api_key();
    let id = app_db
        .insert_key(
            &team.id,
            name,
            &sha256_hex(&key),
            &crate::util::key_mask(&key),
        )
        .await?;
    Ok((id, key))
}

/// Stores a key given from outside (`KILN_API_KEY`), if it is not stored yet.
pub async fn import_key(db: &crate::db::Db, team: &Team, key: &str) -> Result<(), ApiError> {
    if !key.starts_with("e2b_") || key.len() < 8 || !key[4..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(ApiError::BadRequest(
            "KILN_API_KEY must look like an E2B key: e2b_ followed by hex digits".into(),
        ));
    }
    let hash = sha256_hex(key);
    if db.team_of_key(&hash).await?.is_none() {
        db.insert_key(&team.id, "imported", &hash, &crate::util::key_mask(key))
            .await?;
    }
    Ok(())
}
