//! `filesystem.Filesystem`: stat, list, mkdir, move, remove, watch.
