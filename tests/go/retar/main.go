// retar re-encodes a tar the way stargz-snapshotter's Build does: Go's archive/tar reads
// each header and tar.Writer writes it back (Header.Format carried), then tar-split's
// fork of archive/tar reads and writes the result again. No EOF blocks are written, as in
// an eStargz payload. Usage: retar < in.tar > out.tar
package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"

	splittar "github.com/vbatts/tar-split/archive/tar"
)

func fail(err error) {
	fmt.Fprintln(os.Stderr, "retar:", err)
	os.Exit(1)
}

func goPass(in io.Reader, out io.Writer) {
	tr := tar.NewReader(in)
	tw := tar.NewWriter(out)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail(err)
		}
		if err := tw.WriteHeader(h); err != nil {
			fail(err)
		}
		if _, err := io.Copy(tw, tr); err != nil {
			fail(err)
		}
	}
	if err := tw.Flush(); err != nil {
		fail(err)
	}
}

func splitPass(in io.Reader, out io.Writer) {
	tr := splittar.NewReader(in)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail(err)
		}
		tw := splittar.NewWriter(out) // a new writer per entry, as estargz's Writer does
		if err := tw.WriteHeader(h); err != nil {
			fail(err)
		}
		if _, err := io.Copy(tw, tr); err != nil {
			fail(err)
		}
		if err := tw.Flush(); err != nil {
			fail(err)
		}
	}
}

func main() {
	var mid bytes.Buffer
	goPass(os.Stdin, &mid)
	splitPass(&mid, os.Stdout)
}
