//! The layout of run directories: every output file name, and the typed results written there.
