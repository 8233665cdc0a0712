//! Enumerations cross the database boundary as types: a row decodes into the enum or fails
//! loudly, naming the value it held.

use herald::domain::{Channel, DeliveryStatus, Domain, Locale};

use crate::helpers::spawn_front_half;

#[tokio::test]
async fn enumerations_are_stored_by_name_and_an_unknown_name_fails_to_decode_with_the_value() {
    let app = spawn_front_half(|_| {}).await;
    let (channel, status, domain, locale): (Channel, DeliveryStatus, Domain, Locale) =
        sqlx::query_as("SELECT $1::text, $2::text, $3::text, $4::text")
            .bind(Channel::InApp)
            .bind(DeliveryStatus::Skipped)
            .bind(Domain::Subscription)
            .bind(Locale::Ko)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        (channel, status, domain, locale),
        (
            Channel::InApp,
            DeliveryStatus::Skipped,
            Domain::Subscription,
            Locale::Ko
        )
    );
    let names: (String, String) = sqlx::query_as("SELECT $1::text, $2::text[]::text")
        .bind(Channel::Kakaotalk)
        .bind([Channel::Email, Channel::Push])
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(names, ("KAKAOTALK".to_owned(), "{EMAIL,PUSH}".to_owned()));

    let error = sqlx::query_scalar::<_, Channel>("SELECT 'CARRIER_PIGEON'::text")
        .fetch_one(&app.db)
        .await
        .expect_err("an unknown channel does not decode");
    assert!(error.to_string().contains("CARRIER_PIGEON"), "{error}");
}
