// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title ExecutionLedger: public anchor of transparency-log checkpoints.
/// @notice Every execution record is a leaf of the coordinator's RFC 6962 Merkle log;
///         this contract stores only signed checkpoints' tree heads: (origin, size, root).
///         `originHash` is sha256 of the log's origin line (UTF-8). Per recorder
///         (msg.sender) and origin, sizes must grow: anchoring an already anchored
///         (size, root) again is a no-op (no event, no revert) so a re-sent batch is
///         harmless; any other size at or below the latest reverts. Auditors trust
///         events by recorder address: anyone may call this contract, only known
///         recorders count.
contract ExecutionLedger {
    /// @dev recorder => originHash => size => root (zero = not anchored).
    mapping(address => mapping(bytes32 => mapping(uint64 => bytes32))) private _roots;
    /// @dev recorder => originHash => largest anchored size.
    mapping(address => mapping(bytes32 => uint64)) private _latest;

    event CheckpointAnchored(bytes32 indexed originHash, address indexed recorder, uint64 indexed size, bytes32 root);

    error SizeNotIncreasing(uint64 size, uint64 latest);
    error ZeroRoot();
    error LengthMismatch();

    /// @notice Anchor one checkpoint. Returns false when this exact (size, root) was anchored already.
    function anchorCheckpoint(bytes32 originHash, uint64 size, bytes32 root) external returns (bool) {
        return _anchor(originHash, size, root);
    }

    /// @notice Anchor several checkpoints of one log, in increasing size. Returns how many were new.
    function anchorCheckpoints(bytes32 originHash, uint64[] calldata sizes, bytes32[] calldata roots)
        external
        returns (uint256 added)
    {
        if (sizes.length != roots.length) revert LengthMismatch();
        for (uint256 i = 0; i < sizes.length; ++i) {
            if (_anchor(originHash, sizes[i], roots[i])) {
                ++added;
            }
        }
    }

    /// @notice The roots `recorder` anchored for `originHash` at each size (zero where none).
    function rootsOf(address recorder, bytes32 originHash, uint64[] calldata sizes)
        external
        view
        returns (bytes32[] memory out)
    {
        out = new bytes32[](sizes.length);
        mapping(uint64 => bytes32) storage bySize = _roots[recorder][originHash];
        for (uint256 i = 0; i < sizes.length; ++i) {
            out[i] = bySize[sizes[i]];
        }
    }

    /// @notice The largest size `recorder` anchored for `originHash` (0 when none).
    function latestOf(address recorder, bytes32 originHash) external view returns (uint64) {
        return _latest[recorder][originHash];
    }

    function _anchor(bytes32 originHash, uint64 size, bytes32 root) private returns (bool) {
        if (root == bytes32(0)) revert ZeroRoot();
        mapping(uint64 => bytes32) storage bySize = _roots[msg.sender][originHash];
        if (bySize[size] == root) return false;
        uint64 latest = _latest[msg.sender][originHash];
        if (size <= latest) revert SizeNotIncreasing(size, latest);
        bySize[size] = root;
        _latest[msg.sender][originHash] = size;
        emit CheckpointAnchored(originHash, msg.sender, size, root);
        return true;
    }
}
