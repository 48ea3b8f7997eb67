// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title ExecutionLedger: a permissionless, append-only commitment log of task executions.
/// @notice Each recorder (msg.sender) can record a taskId once; a repeated taskId from the
///         same recorder is skipped (no event, no revert) so a re-sent batch is harmless.
///         Ids are sha256 of the UTF-8 task id / agent id; `digest` is sha256 of the
///         record's canonical JSON (see ledger/record.py). Auditors trust events by
///         recorder address: anyone may call this contract, only known recorders count.
contract ExecutionLedger {
    /// @dev recorder => taskId => record digest (zero = not recorded).
    mapping(address => mapping(bytes32 => bytes32)) private _digests;

    event ExecutionRecorded(
        bytes32 indexed taskId,
        bytes32 indexed agentId,
        address indexed recorder,
        bytes32 digest,
        uint8 status,
        uint64 finishedAtMs
    );

    error LengthMismatch();
    error ZeroDigest();

    /// @notice Record one execution. Returns false when this recorder already recorded taskId.
    function record(bytes32 taskId, bytes32 agentId, bytes32 digest, uint8 status, uint64 finishedAtMs)
        external
        returns (bool)
    {
        return _record(taskId, agentId, digest, status, finishedAtMs);
    }

    /// @notice Record many executions in one transaction. Returns how many were new.
    function recordBatch(
        bytes32[] calldata taskIds,
        bytes32[] calldata agentIds,
        bytes32[] calldata digests,
        uint8[] calldata statuses,
        uint64[] calldata finishedAtMs
    ) external returns (uint256 added) {
        uint256 n = taskIds.length;
        if (agentIds.length != n || digests.length != n || statuses.length != n || finishedAtMs.length != n) {
            revert LengthMismatch();
        }
        for (uint256 i = 0; i < n; ++i) {
            if (_record(taskIds[i], agentIds[i], digests[i], statuses[i], finishedAtMs[i])) {
                ++added;
            }
        }
    }

    /// @notice The digest `recorder` recorded for each taskId (zero where none).
    function digestsOf(address recorder, bytes32[] calldata taskIds) external view returns (bytes32[] memory out) {
        out = new bytes32[](taskIds.length);
        mapping(bytes32 => bytes32) storage byTask = _digests[recorder];
        for (uint256 i = 0; i < taskIds.length; ++i) {
            out[i] = byTask[taskIds[i]];
        }
    }

    function _record(bytes32 taskId, bytes32 agentId, bytes32 digest, uint8 status, uint64 finishedAtMs)
        private
        returns (bool)
    {
        if (digest == bytes32(0)) revert ZeroDigest();
        mapping(bytes32 => bytes32) storage byTask = _digests[msg.sender];
        if (byTask[taskId] != bytes32(0)) return false;
        byTask[taskId] = digest;
        emit ExecutionRecorded(taskId, agentId, msg.sender, digest, status, finishedAtMs);
        return true;
    }
}
