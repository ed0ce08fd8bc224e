package e2b

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/warmpool/warmpool/internal/atomicfile"
)

// keyPrefix is what the SDK checks an API key starts with.
const keyPrefix = "e2b_"

// Keys are the API keys a server accepts, compared in constant time.
type Keys struct {
	// digests are SHA-256 of each key: comparing digests keeps the time a
	// comparison takes independent of the key's length and content.
	digests [][sha256.Size]byte
}

// LoadKeys reads a key file: one key per line, "e2b_" and hex digits;
// blank lines and lines starting with # are skipped. A file without keys
// is an error, so that a server never starts open to nobody by accident.
func LoadKeys(path string) (*Keys, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read E2B key file: %w", err)
	}
	k := &Keys{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if err := checkKeyForm(line); err != nil {
			return nil, fmt.Errorf("E2B key file %s line %d: %w", path, n, err)
		}
		k.digests = append(k.digests, sha256.Sum256([]byte(line)))
	}
	if len(k.digests) == 0 {
		return nil, fmt.Errorf("E2B key file %s holds no key (create one with: warmpool e2b key create --file %s)", path, path)
	}
	return k, nil
}

func checkKeyForm(key string) error {
	h, ok := strings.CutPrefix(key, keyPrefix)
	if !ok || len(h) < 32 {
		return errors.New(`a key is "e2b_" and at least 32 hex digits`)
	}
	if _, err := hex.DecodeString(h); err != nil || len(h)%2 != 0 {
		return errors.New(`a key is "e2b_" and an even number of hex digits`)
	}
	return nil
}

// Valid reports whether key is one of k's. Every key is compared, so the
// time taken says nothing about which key (or how much of one) matched.
func (k *Keys) Valid(key string) bool {
	d := sha256.Sum256([]byte(key))
	match := 0
	for i := range k.digests {
		match |= subtle.ConstantTimeCompare(d[:], k.digests[i][:])
	}
	return match == 1
}

// NewKey returns a fresh random key: "e2b_" and 40 hex digits, the form
// E2B's own keys have.
func NewKey() string {
	var b [20]byte
	_, _ = rand.Read(b[:])
	return keyPrefix + hex.EncodeToString(b[:])
}

// AppendKey adds a fresh key to the key file at path (created with mode
// 0600 when missing) and returns it.
func AppendKey(path string) (string, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("create directory of E2B key file: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return "", fmt.Errorf("open E2B key file: %w", err)
	}
	key := NewKey()
	// A file whose last line lacks its newline must not glue two keys.
	prefix := ""
	if st, err := f.Stat(); err == nil && st.Size() > 0 {
		if last, err := lastByte(path); err == nil && last != '\n' {
			prefix = "\n"
		}
	}
	if _, err := f.WriteString(prefix + key + "\n"); err != nil {
		f.Close()
		return "", fmt.Errorf("write E2B key file: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write E2B key file: %w", err)
	}
	return key, nil
}

func lastByte(path string) (byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, st.Size()-1); err != nil {
		return 0, err
	}
	return b[0], nil
}

// tokenSecretSize is the length of the secret sandbox access tokens are
// derived from.
const tokenSecretSize = 32

// LoadTokenSecret reads the secret that sandbox access tokens are derived
// from, creating it (mode 0600) on first use, so that tokens handed out
// stay valid across daemon restarts as the sandboxes do.
func LoadTokenSecret(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		if len(b) != tokenSecretSize {
			return nil, fmt.Errorf("E2B token secret %s: %d bytes, want %d (remove it to make a new one; issued access tokens then stop working)", path, len(b), tokenSecretSize)
		}
		return b, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read E2B token secret: %w", err)
	}
	b = make([]byte, tokenSecretSize)
	_, _ = rand.Read(b)
	if err := atomicfile.WriteBytes(path, 0o600, b); err != nil {
		return nil, fmt.Errorf("E2B token secret: %w", err)
	}
	return b, nil
}

// accessToken is the envd access token of sandbox id: derived, not
// stored, so a token cannot outlive the secret and needs no record.
func accessToken(secret []byte, id string) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte("envd-access-token\x00" + id))
	return hex.EncodeToString(m.Sum(nil))
}

func validAccessToken(secret []byte, id, got string) bool {
	want := accessToken(secret, id)
	return subtle.ConstantTimeCompare([]byte(want), []byte(got)) == 1
}
