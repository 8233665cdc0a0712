//! Herald's integration tests: one binary, run against the real test stack that
//! `make test` starts (PostgreSQL, Redis, Tansu, MailDev). `TEST_LOG=1` shows logs.

mod admin;
mod broadcasts;
mod dead_letters;
mod cli;
mod dispatch;
mod docs;
mod health;
mod helpers;
mod hostile;
mod ingest;
mod intake;
mod metrics;
mod migrations;
mod read_model;
mod settings;
mod topics;
