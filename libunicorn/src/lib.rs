//! libunicorn
