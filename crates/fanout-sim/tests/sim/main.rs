//! Crate tests: a real simulator on a free port, driven by the real async-openai client (and by
//! reqwest where headers matter).

mod batch;
mod chat;
mod common;
mod faults;
mod limits;
