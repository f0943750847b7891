//! unicornd
