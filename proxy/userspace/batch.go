package userspace

import (
	"encoding/binary"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// udpBatchSize is how many datagrams one recvmmsg(2) reads: under load a
// service socket holds several, and one call takes them all.
const udpBatchSize = 8

// mmsghdr is struct mmsghdr: one message of recvmmsg.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32 // the bytes received
	_   [4]byte
}

// udpBatch is a loop's buffers for reading UDP datagrams: the payloads
// (maxDatagram each: upstream read into 4 KiB and silently truncated
// larger datagrams, kubernetes#47659), the senders' addresses and the
// control messages that carry each datagram's destination. The loop reads
// one socket at a time, so one batch serves all of them.
type udpBatch struct {
	bufs  [udpBatchSize]*[maxDatagram]byte
	names [udpBatchSize]unix.RawSockaddrAny
	oobs  [udpBatchSize][64]byte
	iovs  [udpBatchSize]unix.Iovec
	msgs  [udpBatchSize]mmsghdr
}

// maxDatagram is the largest UDP payload over IPv4.
const maxDatagram = 64 * 1024

// recv reads up to udpBatchSize datagrams from fd without blocking and
// returns how many.
func (b *udpBatch) recv(fd int) (int, error) {
	for i := range b.msgs {
		b.iovs[i].Base = &b.buffer(i)[0]
		b.iovs[i].SetLen(maxDatagram)
		h := &b.msgs[i].hdr
		h.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		h.Namelen = unix.SizeofSockaddrAny
		h.Iov = &b.iovs[i]
		h.SetIovlen(1)
		h.Control = &b.oobs[i][0]
		h.SetControllen(len(b.oobs[i]))
		h.Flags = 0
	}
	n, err := raw(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.msgs[0])), uintptr(len(b.msgs)), unix.MSG_DONTWAIT, 0, 0)
	return int(n), err
}

// buffer is payload buffer i, made when first needed.
func (b *udpBatch) buffer(i int) []byte {
	if b.bufs[i] == nil {
		b.bufs[i] = new([maxDatagram]byte)
	}
	return b.bufs[i][:]
}

// datagram is message i of the last recv: who sent it, to which of our
// addresses, and its payload.
func (b *udpBatch) datagram(i int, dst pktinfo) (from netip.AddrPort, to netip.Addr, payload []byte) {
	m := &b.msgs[i]
	payload = b.bufs[i][:m.n]
	switch sa := &b.names[i]; sa.Addr.Family {
	case unix.AF_INET:
		in := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		from = netip.AddrPortFrom(netip.AddrFrom4(in.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&in.Port))[:]))
	case unix.AF_INET6:
		in := (*unix.RawSockaddrInet6)(unsafe.Pointer(sa))
		from = netip.AddrPortFrom(netip.AddrFrom16(in.Addr).Unmap(), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&in.Port))[:]))
	}
	return from, dst.parse(b.oobs[i][:m.hdr.Controllen]), payload
}

// rawSendmsg is sendmsg(2) on fd without blocking.
func rawSendmsg(fd int, h *unix.Msghdr) error {
	_, err := raw(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(h)), unix.MSG_DONTWAIT, 0, 0, 0)
	return err
}
