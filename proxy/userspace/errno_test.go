package userspace

import "syscall"

var syscallReset = syscall.ECONNRESET
