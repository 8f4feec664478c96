package manifest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// MaxFileBytes is the largest manifest file read: 64 MiB holds about a
// hundred thousand Services. A larger file is refused, by name, rather
// than read into memory whole.
const MaxFileBytes = 64 << 20

// ErrBeingWritten is returned for a file that some process has open for
// writing: what it holds now may be half of what is coming, so it is not
// an edit yet. The watcher tries again shortly.
var ErrBeingWritten = errors.New("is being written")

// readWhole reads one manifest file, refusing what is not a whole, regular,
// reasonably sized file: a FIFO or a device (reading one could block
// forever or never end), a file over MaxFileBytes, an empty file (what a
// writer leaves between truncating the file and writing it), and a file
// that a process has open for writing (ErrBeingWritten).
//
// The last is what makes `kubectl get -o yaml > lab.yaml` safe: the shell
// truncates the file at once and kubectl writes it bit by bit, and a half
// written manifest that happens to parse would remove every Service it has
// not reached yet. The kernel tells: a read lease (fcntl F_SETLEASE,
// F_RDLCK) is refused with EAGAIN while any process has the file open for
// writing. While we hold the lease, an open for writing waits for us to
// give it back, which we do right after the read. Where leases are not to
// be had (some filesystems, a process without CAP_LEASE that does not own
// the file), the file is read without one, and the watcher's settle time
// is the only guard.
func readWhole(path string) ([]byte, error) {
	// O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
	// writer. It changes nothing for regular files.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file (%s); manifests must be plain files", path, info.Mode().Type())
	}
	if info.Size() > MaxFileBytes {
		return nil, fmt.Errorf("%s: %d bytes, over the %d MiB a manifest file may have", path, info.Size(), MaxFileBytes>>20)
	}
	unlease, err := readLease(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	defer unlease()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, err
	}
	switch {
	case len(data) > MaxFileBytes:
		return nil, fmt.Errorf("%s: over the %d MiB a manifest file may have", path, MaxFileBytes>>20)
	case len(data) == 0:
		return nil, fmt.Errorf("%s: empty (to serve no Services, leave at least a comment in it)", path)
	}
	return data, nil
}

// readLease takes a read lease on f, and returns how to give it back. It
// returns ErrBeingWritten when a process has f open for writing, and no
// error, with no lease, when leases are not to be had here.
func readLease(f *os.File) (func(), error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return func() {}, nil
	}
	var lerr error
	rc.Control(func(fd uintptr) { _, lerr = unix.FcntlInt(fd, unix.F_SETLEASE, unix.F_RDLCK) })
	switch {
	case errors.Is(lerr, unix.EAGAIN):
		return nil, ErrBeingWritten
	case lerr != nil:
		return func() {}, nil
	}
	return func() {
		rc.Control(func(fd uintptr) { unix.FcntlInt(fd, unix.F_SETLEASE, unix.F_UNLCK) })
	}, nil
}
