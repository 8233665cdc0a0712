//! Herald's integration tests: one binary, run against the real test stack that
//! `make test` starts (PostgreSQL, Redis, Tansu, MailDev). `TEST_LOG=1` shows logs.

mod access;
mod admin;
mod alerts;
mod broadcasts;
mod cli;
mod columns;
mod console;
mod contracts;
mod dead_letters;
mod dispatch;
mod docs;
mod event_types;
mod health;
mod helpers;
mod hostile;
mod imports;
mod inbox;
mod ingest;
mod intake;
mod metrics;
mod migrations;
mod outbound;
mod read_model;
mod receipts;
mod relay;
mod replays;
mod retention;
mod settings;
mod statistics;
mod status_events;
mod templates;
mod timing;
mod topics;
mod webhooks;
