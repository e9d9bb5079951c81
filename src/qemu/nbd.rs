//! NBD client (being written).
