//! The fault suite: Herald keeps its promises under crashes, outages and hostile input.
//!
//! Each scenario drives the real `herald` binary as child processes (so SIGKILL and SIGTERM
//! are real) against the `faults` stack, with a database, topic prefix and Redis prefix of
//! its own; it runs a load, injects the fault (stopping a stack service with
//! `scripts/stack.sh stop faults SERVICE`, or freezing the broker with
//! `scripts/stack.sh pause faults kafka`), then checks every event's fate and prints one
//! line of figures. The scenarios stop shared services, so they run one at a time.
//!
//! Run it with `make test-faults` (scripts/faults.sh), which brings the stack up first. It
//! is not part of a plain `cargo test` (Cargo.toml: `test = false`), which stays fast and
//! needs only the test stack.

mod broker_reset;
mod digest;
mod harness;
mod hostile;
mod instances;
mod membership;
mod outages;
mod sigkill;
