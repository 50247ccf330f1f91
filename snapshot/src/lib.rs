//! The async-fork snapshot engine (see DESIGN.md §1–2). Thin until the snapshot issue lands.
