//! kiln public API.
