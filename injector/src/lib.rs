//! The sidecar injector: the pure pod patch shared by the admission webhook and
//! `meshctl inject`. It must not talk to the network itself; the webhook server wraps it.
