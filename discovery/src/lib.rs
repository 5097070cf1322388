//! Agent discovery through etcd (being built).
