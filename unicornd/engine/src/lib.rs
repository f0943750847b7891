//! unicorn's inference engine.
