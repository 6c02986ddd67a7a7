//! The Docker API proxy on /var/run/weave/weave.sock.
