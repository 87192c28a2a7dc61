//! IO-free HTTP/1.1 (see issue 2). Filled in by the http work.
