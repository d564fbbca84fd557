//! Operating the agent: the admin socket for the CLI.
pub mod api;
pub mod socket;
