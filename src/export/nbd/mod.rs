//! NBD export (being written).
