//! Inventory model (see issue 3/4).
